"""Moderation routes: bans, mutes, slow mode and the moderation log of a room.

Who may moderate a room: any holder of an API key, or a token whose ``moderate``
claim grants the room (and which may read it). Each action is one transaction in
the store (the room's restrictions, its log line, its ``moderation.*`` webhook
event), then a ``Moderated`` command tells every instance
(chat_gateway.delivery.commands): each forgets the room's cached restrictions
and, for a ban, ends the user's subscriptions to the room (``unsubscribed``,
reason ``banned``). The checks themselves are chat_gateway.delivery.moderation.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from chat_gateway.access.auth import bearer, is_api_key
from chat_gateway.api import validation as v
from chat_gateway.api.caller import gateway_of, identify
from chat_gateway.api.responses import json_response
from chat_gateway.delivery.commands import Moderated
from chat_gateway.errors import ApiError
from chat_gateway.pubsub import BrokerUnavailable
from chat_gateway.services import Services
from chat_gateway.storage.moderation import (
    BANNED,
    MUTED,
    SLOW_MODE,
    UNBANNED,
    UNMUTED,
    Action,
    ModerationEntry,
    now_ms,
)

log = logging.getLogger("gateway.moderation")

API_KEY = "api_key"  # the ``by`` of an action taken with an API key
KINDS = {"bans": (BANNED, UNBANNED), "mutes": (MUTED, UNMUTED)}


def _moderator(request: Request, room: str) -> tuple[Services, str]:
    """The gateway and who acts: ``api_key``, or the token's sub where its
    ``moderate`` claim grants the room (403 otherwise)."""
    gw = gateway_of(request)
    key = bearer(request.headers)
    if key is not None and is_api_key(gw.auth, key):
        return gw, API_KEY
    identity = identify(request)
    if not identity.may_moderate(room):
        raise ApiError(
            "forbidden",
            f"moderating room {room!r} needs an API key or a token whose "
            "moderate claim grants the room",
        )
    return gw, identity.name


async def _body(request: Request, gw: Services, schema: dict[str, Any]) -> dict[str, Any]:
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    return await v.json_body(request, gw.settings.max_body_bytes, schema)


async def _act(gw: Services, room: str, action: Action) -> ModerationEntry | None:
    """Store the action, then tell every instance. When the broker cannot carry the
    command, this instance applies it and the caller hears 503: the action is in
    force on every instance's posts (the store refuses them) and in each cache
    within its refresh, but open subscriptions elsewhere were not ended."""
    done = await gw.store.moderate(room, action)
    if done is None:
        return None
    command = Moderated(room, action.user, action.action)
    try:
        await gw.control.send(command)
    except BrokerUnavailable as exc:
        log.warning("moderation stored but not announced: %s", exc)
        await gw.control.apply(command)
        raise ApiError(
            "unavailable",
            f"the {action.action.replace('_', ' ')} action is stored and in force, but not "
            "every instance could be told now; repeat the request to end open subscriptions",
            entry=done.to_dict(),
        ) from None
    log.info(
        "moderation action",
        extra={"room": room, "action": action.action, "user": action.user, "by": action.by},
    )
    return done


async def restrict(request: Request) -> Response:
    """``POST /v1/rooms/{room}/bans`` and ``…/mutes``."""
    room = v.room_name(request.path_params["room"])
    kind, _ = KINDS[request.url.path.rsplit("/", 1)[1]]
    gw, by = _moderator(request, room)
    body = await _body(request, gw, v.RESTRICTION_BODY)
    user = v.user_name(body.get("user"), blank=False)
    duration = v.int_field(body, "duration", v.RESTRICTION_BODY)
    reason = v.reason(body.get("reason", ""))
    done = await _act(gw, room, Action(kind, by, user=user, reason=reason, duration=duration))
    if done is None:  # pragma: no cover - a ban or mute always changes the room
        raise ApiError("internal", "the action was not recorded")
    return json_response(done.to_dict(), 201)


async def lift(request: Request) -> Response:
    """``DELETE /v1/rooms/{room}/bans/{user}`` and ``…/mutes/{user}``."""
    room = v.room_name(request.path_params["room"])
    _, kind = KINDS[request.url.path.split("/")[4]]
    gw, by = _moderator(request, room)
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    user = v.user_name(request.path_params["user"], blank=False)
    done = await _act(gw, room, Action(kind, by, user=user))
    if done is None:
        what = "banned from" if kind == UNBANNED else "muted in"
        raise ApiError("not_found", f"{user!r} is not {what} room {room!r}")
    return json_response(done.to_dict())


async def listing(request: Request) -> Response:
    """``GET /v1/rooms/{room}/bans`` and ``…/mutes``: the active ones, by user."""
    room = v.room_name(request.path_params["room"])
    name = request.url.path.rsplit("/", 1)[1]
    kind, _ = KINDS[name]
    gw, _by = _moderator(request, room)
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    state = (await gw.store.room_moderations([room]))[room]
    return json_response({"room": room, name: [r.to_dict() for r in state.active(kind, now_ms())]})


async def bans(request: Request) -> Response:
    return await (restrict if request.method == "POST" else listing)(request)


async def settings(request: Request) -> Response:
    """``PUT /v1/rooms/{room}/settings`` (a moderator) and ``GET`` (a reader)."""
    room = v.room_name(request.path_params["room"])
    if request.method == "GET":
        gw = gateway_of(request)
        identify(request).check_room(room)
        v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
        state = await gw.moderation.state(room)
        return json_response({"room": room, "slow_mode": state.slow_mode})
    gw, by = _moderator(request, room)
    body = await _body(request, gw, v.SETTINGS_BODY)
    slow = v.int_field(body, "slow_mode", v.SETTINGS_BODY)
    if slow is None:
        raise ApiError("invalid_request", "slow_mode is required", field="slow_mode")
    await _act(gw, room, Action(SLOW_MODE, by, slow_mode=slow))
    return json_response({"room": room, "slow_mode": slow})


async def moderation_log(request: Request) -> Response:
    """``GET /v1/rooms/{room}/moderation``: the room's actions, newest first."""
    room = v.room_name(request.path_params["room"])
    gw, _by = _moderator(request, room)
    q = request.query_params
    v.only_fields(dict(q), v.fields(v.MODERATION_LOG_QUERY))
    limit = v.query_limit(q.get("limit"), v.MODERATION_LOG_QUERY)
    raw = q.get("cursor")
    before = None
    if raw is not None:
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 18:
            raise ApiError(
                "invalid_request",
                "cursor must be the next_cursor of a previous page",
                field="cursor",
            )
        before = int(raw)
    entries = await gw.store.moderation_log(room, limit=limit + 1, before=before)
    page = entries[:limit]
    return json_response(
        {
            "room": room,
            "actions": [e.to_dict() for e in page],
            "next_cursor": str(page[-1].id) if len(entries) > limit else None,
        }
    )
