"""The catalogue of error codes and WebSocket close codes, each with its meaning.

Every 4xx/5xx JSON body has the shape
``{"error": {"code": "...", "message": "human sentence", ...extra}}``;
a refused WebSocket frame gets ``{"type": "error", "ref": ..., "code": ..., "message": ...}``.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from starlette.responses import Response

from chat_gateway.storage import StoreUnavailable

log = logging.getLogger("gateway.errors")

# code -> (HTTP status, meaning)
CODES: dict[str, tuple[int, str]] = {
    "invalid_json": (400, "the body or frame is not valid JSON"),
    "invalid_request": (422, "a field, parameter or room name fails validation"),
    "unauthorized": (401, "credentials are missing, invalid or expired"),
    "forbidden": (403, "the credentials do not grant this room or action"),
    "banned": (
        403,
        "the user is banned from the room: no reads, subscriptions, posts or changes "
        "there until the ban ends (expires_in, when it has an end) or is lifted",
    ),
    "muted": (
        403,
        "the user is muted in the room: reading is allowed, posting, editing and "
        "typing are not until the mute ends (expires_in) or is lifted",
    ),
    "rejected": (
        403,
        "the backend's publish hook (PUBLISH_HOOK_URL) refused the post or edit; "
        "the message says why, in the backend's words; nothing was stored",
    ),
    "not_found": (404, "no such route or object"),
    "method_not_allowed": (405, "the route exists but not with this method"),
    "idempotency_conflict": (
        409,
        "the same identity reused an Idempotency-Key in the room "
        "with a different message (text or author)",
    ),
    "message_deleted": (
        409,
        "the message is deleted: its tombstone takes no reactions and no replies",
    ),
    "wrong_room_kind": (
        409,
        "the room's namespace is of another kind (NAMESPACES_FILE): an ephemeral room "
        "stores nothing, so it has no history, posts, edits, deletes or read positions; "
        "emit there instead (and publish only in stored rooms)",
    ),
    "too_large": (413, "the body or frame exceeds the size limit"),
    "request_timeout": (
        408,
        "the request head or body did not arrive within "
        "HTTP_HEADER_TIMEOUT / HTTP_BODY_TIMEOUT; the connection is closed",
    ),
    "headers_too_large": (
        431,
        "the request line and headers exceed HTTP_MAX_HEADER_BYTES; the connection is closed",
    ),
    "upgrade_required": (426, "the route speaks WebSocket only: open it with an Upgrade request"),
    "rate_limited": (429, "the identity's token bucket is empty; retry after retry_after"),
    "slow_mode": (
        429,
        "slow mode is on in the room: one post per slow_mode seconds per user; "
        "retry after retry_after",
    ),
    "too_many_connections": (429, "the identity holds too many connections"),
    "too_many_subscriptions": (
        429,
        "the WebSocket holds MAX_SUBSCRIPTIONS_PER_CONNECTION rooms; unsubscribe from one first",
    ),
    "unavailable": (
        503,
        "a dependency (database, broker) is down, or the instance is full "
        "or shutting down; nothing was stored, unless the body says "
        '"outcome": "unknown" (the write was sent, its answer never came)',
    ),
    "internal": (500, "an unexpected failure; nothing was stored"),
}

# WebSocket close codes the gateway uses (RFC 6455 and the IANA registry).
CLOSE_NORMAL = 1000  # the client asked to close
CLOSE_GOING_AWAY = 1001  # the instance is shutting down: reconnect elsewhere
CLOSE_POLICY_VIOLATION = 1008  # credentials expired or were refused after the upgrade
CLOSE_TRY_AGAIN_LATER = 1013  # the client could not keep up: resume with `since`
# Application codes (4000-4999, RFC 6455 section 7.4.2).
CLOSE_DISCONNECTED = 4001  # a backend disconnected the user (server API); reconnecting is allowed


class ApiError(Exception):
    """A refusal with a catalogued code; rendered as the error body or an error frame."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        if code not in CODES:
            raise ValueError(f"unknown error code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or CODES[code][0]
        self.headers = headers or {}
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}

    def frame(self, ref: Any = None) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "error"}
        if ref is not None:
            out["ref"] = ref
        out.update(code=self.code, message=self.message, **self.extra)
        return out

    def response(self) -> Response:
        return Response(
            orjson.dumps(self.body()),
            status_code=self.status,
            headers=self.headers,
            media_type="application/json",
        )


def internal() -> ApiError:
    """The refusal for an unexpected failure: a 500 body or an ``internal`` error frame."""
    return ApiError("internal", "an unexpected error occurred; nothing was stored")


def wrong_room_kind(room: str, kind: str, operation: str) -> ApiError:
    """The refusal of ``operation`` in ``room``, whose namespace is of ``kind``."""
    return ApiError(
        "wrong_room_kind",
        f"{room!r} is a{'n' if kind[0] in 'aeiou' else ''} {kind} room: {operation} "
        "is not possible there",
        room=room,
        kind=kind,
    )


def store_unavailable(exc: StoreUnavailable, where: str) -> ApiError:
    """The refusal when the message store cannot be reached (503 ``unavailable``), for
    every route and frame; logged with ``where`` it happened. When the write had
    been sent and its answer did not come, it may have been stored: the body says
    so, with ``"outcome": "unknown"``, instead of "nothing was stored"."""
    log.warning("store unavailable on %s: %s", where, exc)
    if exc.outcome_unknown:
        return ApiError(
            "unavailable",
            "the message store did not answer in time after the write was sent: it may "
            "have been stored; a retry with the same Idempotency-Key is safe (it returns "
            "what was stored, if anything was)",
            outcome="unknown",
        )
    return ApiError(
        "unavailable", "the message store is unavailable; nothing was stored, retry later"
    )
