"""State rooms' routes: the latest JSON value per key (docs/API.md, "State rooms").

``PUT /v1/rooms/{room}/state/{key}`` sets a key, ``DELETE`` the same path deletes
it (a tombstone, so resuming subscribers learn of it), ``PATCH
/v1/rooms/{room}/state`` sets and deletes several keys in one transaction with
contiguous seqs, ``GET /v1/rooms/{room}/state`` reads every live key (from the
values the instance holds for its subscribers when they are current, else one
store read shared by the GETs of the room: ``Hub.state_document``). Each write
takes the room's next seq and reaches every subscriber as a ``state`` frame
(chat_gateway.delivery.hub).

Who may write: an API key, or a user where the namespace's ``client_publish`` is
true (in open mode with no ``API_KEYS``, everybody is a backend, as on
``/v1/publish``). A user's token must grant the room for posting; bans and mutes
refuse a user's writes (also checked under the room's lock at commit), a ban its
reads. Writes take a token from the namespace's post bucket. Only rooms whose
namespace is ``kind = "state"`` have state: elsewhere 409 ``wrong_room_kind``.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from chat_gateway.access.auth import bearer, is_api_key
from chat_gateway.access.ratelimit import Decision
from chat_gateway.api import validation as v
from chat_gateway.api.caller import gateway_of, identify, key_caller, known_user
from chat_gateway.api.responses import encoded_json_response
from chat_gateway.core.namespaces import RoomKind
from chat_gateway.errors import ApiError, wrong_room_kind
from chat_gateway.services import Services


def state_room(gw: Services, room: str, operation: str) -> None:
    """Refuse (409 ``wrong_room_kind``) ``operation`` in a room that is not a state room."""
    kind = gw.settings.namespaces_file.of(room).kind
    if kind is not RoomKind.STATE:
        raise wrong_room_kind(room, kind.value, operation)


async def _writer(request: Request, gw: Services, room: str) -> tuple[str | None, Decision]:
    """Who writes: a backend (author None) or a user allowed to (see the module's
    docstring); its bucket's token taken. Returns the user and the rate decision."""
    key = bearer(request.headers)
    auth = gw.auth
    if is_api_key(auth, key) or (auth.open_mode and not auth.keys_required):
        state_room(gw, room, "writing state")
        return None, await gw.rates.check_post(room, key_caller(request, key))
    identity = identify(request)
    identity.check_post(room)
    state_room(gw, room, "writing state")
    if not gw.settings.namespaces_file.of(room).client_publish:
        raise ApiError(
            "forbidden",
            f"only API keys write state in {room!r} (client_publish = false in its namespace)",
        )
    decision = await gw.rates.check_post(room, identity.bucket)
    user = known_user(identity)
    if user is not None:
        await gw.moderation.check_post(room, user, moderator=identity.may_moderate(room))
    return user, decision


async def state_key(request: Request) -> Response:
    """``PUT`` / ``DELETE /v1/rooms/{room}/state/{key}``."""
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    key = v.state_key(request.path_params["key"])
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    if request.method == "PUT":
        body = await v.json_body(request, gw.settings.max_body_bytes, v.PUT_STATE)
        value: bytes | None = v.state_value(
            body.get("value", v.ABSENT), gw.settings.state_max_value_bytes
        )
    else:
        value = None
    author, decision = await _writer(request, gw, room)
    (entry,) = await gw.publisher.write_state(room, [(key, value)], author=author)
    return encoded_json_response(entry.answer(), 200, decision.headers())


async def state(request: Request) -> Response:
    """``GET`` / ``PATCH /v1/rooms/{room}/state``."""
    if request.method == "PATCH":
        return await patch_state(request)
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    user = None
    if not is_api_key(gw.auth, bearer(request.headers)):
        identity = identify(request)
        identity.check_room(room)
        user = known_user(identity)
    state_room(gw, room, "reading state")
    await gw.moderation.check_read(room, user)
    return encoded_json_response(await gw.hub.state_document(room))


async def patch_state(request: Request) -> Response:
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    body = await v.json_body(request, gw.settings.max_body_bytes, v.PATCH_STATE)
    writes = _patch_writes(body, gw.settings.state_max_value_bytes)
    author, decision = await _writer(request, gw, room)
    entries = await gw.publisher.write_state(room, writes, author=author)
    answer = (
        b'{"room":'
        + orjson.dumps(room)
        + b',"seq":%d,"writes":[' % entries[-1].seq
        + b",".join(b'{"seq":%d,' % e.seq + e.to_json()[1:] for e in entries)
        + b"]}"
    )
    return encoded_json_response(answer, 200, decision.headers())


def _patch_writes(body: dict[str, Any], limit: int) -> list[tuple[str, bytes | None]]:
    """The writes of a PATCH body, every entry checked before anything is written:
    ``set`` in its order, then ``delete`` (a key in both is deleted)."""
    sets = body.get("set", {})
    deletes = body.get("delete", [])
    if not isinstance(sets, dict):
        raise ApiError("invalid_request", "set must be an object of key -> value", field="set")
    if not isinstance(deletes, list):
        raise ApiError("invalid_request", "delete must be an array of keys", field="delete")
    if not sets and not deletes:
        raise ApiError("invalid_request", "nothing to write: give set and/or delete")
    for name, given in (("set", sets), ("delete", deletes)):
        if name in body and not given:
            raise ApiError("invalid_request", f"{name} is empty: leave it out", field=name)
    cap = v.MAX_STATE_WRITES
    if len(sets) > cap or len(deletes) > cap:
        raise ApiError(
            "invalid_request", f"at most {cap} keys in set and {cap} in delete", limit=cap
        )
    deleted = {v.state_key(key) for key in deletes}
    if len(deleted) < len(deletes):
        raise ApiError("invalid_request", "a key is twice in delete", field="delete")
    # A key set and deleted in one PATCH ends deleted: only its delete is written.
    writes: list[tuple[str, bytes | None]] = [
        (v.state_key(key), v.state_value(value, limit, f"set.{key}")) for key, value in sets.items()
    ]
    writes = [w for w in writes if w[0] not in deleted]
    writes.extend((key, None) for key in deletes)
    return writes
