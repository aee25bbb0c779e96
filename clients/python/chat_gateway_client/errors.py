"""Error codes and close codes, each with its meaning."""

from __future__ import annotations

import contextlib
import enum
import json
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
        return cls.of_http(r.status_code, r.content, r.headers.get("retry-after"), r.reason_phrase)

    @classmethod
    def of_http(
        cls, status: int, body: bytes | bytearray, retry_after_header: str | None, phrase: str = ""
    ) -> GatewayError:
        """An HTTP answer with the error body (a request's or a refused upgrade's):
        the code, message and ``retry_after`` as the server sent them, else the
        ``Retry-After`` header, else what the status says."""
        try:
            parsed = json.loads(body or b"{}")
            error = parsed.get("error") if isinstance(parsed, dict) else None
        except ValueError:
            error = None
        error = error if isinstance(error, dict) else {}
        retry_after = error.get("retry_after")
        if not isinstance(retry_after, (int, float)) and retry_after_header:
            with contextlib.suppress(ValueError):
                retry_after = float(retry_after_header)
        return cls(
            str(error.get("code", f"http_{status}")),
            str(error.get("message") or phrase or f"HTTP {status}"),
            status=status,
            retry_after=retry_after if isinstance(retry_after, (int, float)) else None,
            detail=error,
        )
