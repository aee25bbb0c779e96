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
    body = await _body(request, gw, v.DISCONNECT)
    user = v.user_name(body.get("user"))
    reason = v.close_reason(body.get("reason", ""))
    await _send(gw, Disconnect(user, reason))
    return json_response({"status": "accepted", "user": user}, 202)


async def unsubscribe(request: Request) -> Response:
    gw = _require_key(request)
    body = await _body(request, gw, v.UNSUBSCRIBE)
    user = v.user_name(body.get("user"))
    room = v.room_name(body.get("room"))
    reason = v.close_reason(body.get("reason", ""))
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
    v.only_fields(dict(q), v.fields(v.ROOMS_QUERY))
    limit = v.query_limit(q.get("limit"), v.ROOMS_QUERY)
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
    body = await _body(request, gw, v.BROADCAST)
    rooms = v.room_list(body.get("rooms"))
    event = v.event_name(body.get("event"))
    data = v.event_data(body.get("data", v.ABSENT))
    # One bucket per API key, shared with POST /v1/publish: one call, one token.
    decision = await gw.rates.check(PUBLISH, key_caller(request, bearer(request.headers)))
    await gw.publisher.publish_events(rooms, event, data)
    return json_response(
        {"status": "accepted", "rooms": len(rooms), "event": event}, 202, decision.headers()
    )
