"""The server API: a backend steers the gateway, on every instance (API key only).

Commands that change connections (disconnect, unsubscribe) and the purge's
notice travel as control messages (chat_gateway.delivery.commands) and are applied by every
instance; they are answered 202 once sent. Figures across instances:

- subscribers of a room: this instance's hub, plus what every other instance
  shared in its figures (chat_gateway.ops.shared_figures: each instance writes its rooms
  and their subscriber counts to one Redis hash every second; an entry older
  than ``ENTRY_MAX_AGE`` seconds is an instance gone). A count is therefore at
  most about a second old. Without Redis the instance is the cluster.
- presence: the room's present users (chat_gateway.delivery.presence), on any instance.
- latest_seq: the store's counter (through the history cache's seq keys for a
  page of rooms, the store where a key is missing).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from chat_gateway.access.auth import bearer
from chat_gateway.access.ratelimit import PUBLISH
from chat_gateway.api import validation as v
from chat_gateway.api.caller import gateway_of, key_caller
from chat_gateway.api.responses import json_response
from chat_gateway.delivery.commands import Disconnect, Purged, Unsubscribe
from chat_gateway.errors import ApiError
from chat_gateway.pubsub import BrokerUnavailable
from chat_gateway.services import Services

log = logging.getLogger("gateway.server")

MAX_REASON_BYTES = 120  # it travels in a WebSocket close frame (at most 123 bytes)
MAX_USER = 128
MAX_BROADCAST_ROOMS = 100
MAX_ROOMS_PAGE = 1000
ROOMS_PAGE_DEFAULT = 100

USER: dict[str, Any] = {
    "type": "string",
    "minLength": 1,
    "maxLength": MAX_USER,
    "pattern": r"^[^\x00]*$",
    "description": "a token's sub, or the ?user= of an open-mode connection",
}
REASON: dict[str, Any] = {
    "type": "string",
    "maxLength": MAX_REASON_BYTES,
    "default": "",
    "pattern": r"^[^\x00]*$",
    "description": f"at most {MAX_REASON_BYTES} bytes in UTF-8",
}
DISCONNECT = v.object_schema(["user"], user=USER, reason=REASON)
UNSUBSCRIBE = v.object_schema(["user", "room"], user=USER, room=v.ROOM, reason=REASON)
BROADCAST = v.object_schema(
    ["rooms", "event"],
    rooms={
        "type": "array",
        "items": v.ROOM,
        "minItems": 1,
        "maxItems": MAX_BROADCAST_ROOMS,
        "uniqueItems": True,
    },
    event=v.EVENT,
    data={"type": "object"},
)
ROOMS_QUERY = v.object_schema(
    [],
    limit={
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_ROOMS_PAGE,
        "default": ROOMS_PAGE_DEFAULT,
    },
    cursor={**v.ROOM, "description": "the next of the previous page: rooms after this name"},
)


def _require_key(request: Request) -> Services:
    """The gateway, if the request carries one of API_KEYS. The server API is never
    open: with no key configured every call is refused."""
    gw = gateway_of(request)
    if not gw.auth.keys_required:
        raise ApiError(
            "unauthorized", "the server API needs an API key, and none is configured (set API_KEYS)"
        )
    gw.auth.check_api_key(bearer(request.headers))
    return gw


async def _body(request: Request, gw: Services, schema: dict[str, Any]) -> dict[str, Any]:
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    return await v.json_body(request, gw.settings.max_body_bytes, schema)


def _user(value: Any) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_USER or "\x00" in value:
        raise ApiError(
            "invalid_request",
            f"user must be a string of 1..{MAX_USER} characters, no NUL",
            field="user",
        )
    return value


def _reason(value: Any) -> str:
    if not isinstance(value, str):
        raise ApiError("invalid_request", "reason must be a string (or left out)", field="reason")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:
        size = -1
    if not 0 <= size <= MAX_REASON_BYTES or "\x00" in value:
        raise ApiError(
            "invalid_request",
            f"reason must be valid text of at most {MAX_REASON_BYTES} bytes in UTF-8",
            field="reason",
        )
    return value


async def _send(gw: Services, command: Any) -> None:
    try:
        await gw.control.send(command)
    except BrokerUnavailable as exc:
        log.warning("server API command not sent: %s", exc)
        raise ApiError(
            "unavailable", "the broker is unavailable; nothing was sent, retry later"
        ) from None


async def disconnect(request: Request) -> Response:
    gw = _require_key(request)
    body = await _body(request, gw, DISCONNECT)
    user = _user(body.get("user"))
    reason = _reason(body.get("reason", ""))
    await _send(gw, Disconnect(user, reason))
    return json_response({"status": "accepted", "user": user}, 202)


async def unsubscribe(request: Request) -> Response:
    gw = _require_key(request)
    body = await _body(request, gw, UNSUBSCRIBE)
    user = _user(body.get("user"))
    room = v.room_name(body.get("room"))
    reason = _reason(body.get("reason", ""))
    await _send(gw, Unsubscribe(user, room, reason))
    return json_response({"status": "accepted", "user": user, "room": room}, 202)


async def subscriber_counts(gw: Services) -> dict[str, int]:
    """Subscribers per room with at least one, over every instance (see the module)."""
    counts = {name: r.subscribers for name, r in gw.hub.room_stats().items() if r.subscribers}
    for entry in await gw.figures.others():
        for name, (_seq, subs) in entry["c"]["rooms"].items():
            if subs:
                counts[name] = counts.get(name, 0) + int(subs)
    return counts


async def list_rooms(request: Request) -> Response:
    gw = _require_key(request)
    q = request.query_params
    v.only_fields(dict(q), v.fields(ROOMS_QUERY))
    limit = v.limit_param(q.get("limit"), ROOMS_PAGE_DEFAULT, MAX_ROOMS_PAGE)
    cursor = q.get("cursor")
    if cursor is not None and not v.ROOM_RE.fullmatch(cursor):
        raise ApiError(
            "invalid_request", "cursor must be the next of a previous page", field="cursor"
        )
    counts = await subscriber_counts(gw)
    names = sorted(name for name in counts if cursor is None or name > cursor)
    page, more = names[:limit], len(names) > limit
    seqs = await gw.history.latest_seqs(page)
    for name in page:
        if name not in seqs:  # no cache key: the store says
            seqs[name] = await gw.store.latest_seq(name)
    return json_response(
        {
            "rooms": [
                {"room": name, "subscribers": counts[name], "latest_seq": seqs[name]}
                for name in page
            ],
            "next": page[-1] if more else None,
        }
    )


async def room_info(request: Request) -> Response:
    gw = _require_key(request)
    room = v.room_name(request.path_params["room"])
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    counts, latest = await asyncio.gather(subscriber_counts(gw), gw.store.latest_seq(room))
    try:
        present = await gw.presence.members(room)
    except Exception as exc:
        log.warning("presence read failed: %r", exc)
        raise ApiError("unavailable", "presence is unavailable; retry later") from None
    return json_response(
        {
            "room": room,
            "subscribers": counts.get(room, 0),
            "presence": len(present),
            "latest_seq": latest,
        }
    )


async def purge_messages(request: Request) -> Response:
    gw = _require_key(request)
    room = v.room_name(request.path_params["room"])
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    removed = await gw.store.purge_room(room)
    try:
        await gw.history.purged(room)
        await gw.control.send(Purged(room))
    except Exception as exc:
        log.warning("room %s purged, but the purge was not announced: %r", room, exc)
        raise ApiError(
            "unavailable",
            f"{removed} messages were purged, but not every "
            "instance could be told; repeat the request",
            removed=removed,
        ) from None
    log.info("room history purged", extra={"room": room, "removed": removed})
    return json_response({"room": room, "removed": removed})


async def broadcast(request: Request) -> Response:
    gw = _require_key(request)
    body = await _body(request, gw, BROADCAST)
    rooms = body.get("rooms")
    if not isinstance(rooms, list) or not 1 <= len(rooms) <= MAX_BROADCAST_ROOMS:
        raise ApiError(
            "invalid_request",
            f"rooms must be a list of 1..{MAX_BROADCAST_ROOMS} room names",
            field="rooms",
        )
    rooms = [v.room_name(room) for room in rooms]
    if len(set(rooms)) != len(rooms):
        raise ApiError("invalid_request", "rooms must not repeat a room", field="rooms")
    event = v.event_name(body.get("event"))
    data = v.event_data(body.get("data", v.ABSENT))
    # One bucket per API key, shared with POST /v1/publish: one call, one token.
    decision = await gw.rates.check(PUBLISH, key_caller(request, bearer(request.headers)))
    await gw.publisher.publish_events(rooms, event, data)
    return json_response(
        {"status": "accepted", "rooms": len(rooms), "event": event}, 202, decision.headers()
    )
