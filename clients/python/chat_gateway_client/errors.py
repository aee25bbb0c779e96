"""Error codes and close codes, each with its meaning."""

from __future__ import annotations

import enum
from typing import Any

import httpx


class CloseCode(enum.IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # the instance shuts down: reconnect elsewhere
    ABNORMAL = 1006  # no close frame: network loss, killed instance
    POLICY_VIOLATION = 1008  # token refused or expired
    TRY_AGAIN_LATER = 1013  # the client could not keep up: resume with since
    SERVER_DISCONNECT = 4001  # the server API disconnected this user: final
    GAP = 4002  # client side: a seq past cursor + 1 arrived; reopen and replay


class GatewayError(Exception):
    """An error body or error frame of the gateway, or of this client.

    ``code`` is the API code (``rate_limited``, ``forbidden``, ``unavailable``, …) or
    one of the client's own: ``closed``, ``unsubscribed``, ``invalid_frame``,
    ``token_refresh_failed``. ``status`` is the HTTP status where there was one,
    ``retry_after`` the seconds the gateway asked to wait, ``detail`` the whole object.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.retry_after = retry_after
        self.detail = detail or {}
        self.room: str | None = None  # a refused subscribe's room
        self.frame: str | None = None  # "refresh" for a refused in-band refresh

    @classmethod
    def of_frame(cls, f: dict[str, Any]) -> GatewayError:
        return cls(
            str(f.get("code")),
            str(f.get("message", "")),
            retry_after=f.get("retry_after"),
            detail=f,
        )

    @classmethod
    def of_response(cls, r: httpx.Response) -> GatewayError:
        try:
            body = r.json().get("error") or {}
        except (ValueError, AttributeError):
            body = {}
        return cls(
            str(body.get("code", f"http_{r.status_code}")),
            str(body.get("message", r.reason_phrase)),
            status=r.status_code,
            retry_after=body.get("retry_after"),
            detail=body,
        )
