"""Chat routes on top of messages: edits and deletes, read positions
(the work itself: chat_gateway.delivery.chat).

Who may change a message: its author (the token's ``sub``; in open mode the
``author`` given, as on a post) where the token may post (a read-only grant may
not), a token whose ``moderate`` claim grants the room, or any holder of an API
key, for any message. All count against the post bucket.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from chat_gateway.access.auth import Identity
from chat_gateway.access.ratelimit import REACT, READ
from chat_gateway.api import validation as v
from chat_gateway.api.caller import (
    api_key,
    gateway_of,
    identify,
    key_caller,
    known_user,
    stored_room,
)
from chat_gateway.api.responses import encoded_json_response, json_response
from chat_gateway.delivery.publish_hook import Draft, Kind
from chat_gateway.errors import ApiError
from chat_gateway.services import Services
from chat_gateway.storage import MessageDeleted, MessageNotFound, ReadPosition


def position_json(pos: ReadPosition) -> dict[str, Any]:
    return {"room": pos.room, "seq": pos.seq, "unread": pos.unread, "mentions": pos.mentions}


async def screened(
    gw: Services, kind: Kind, room: str, author: str, text: str, *, seq: int | None = None
) -> str:
    """The text to store for a user's post or edit, once the publish hook
    (PUBLISH_HOOK_URL) had its say: the one call every user path makes after its
    own checks and before the store. A modified text is checked as a posted one."""
    return await gw.publish_hook.screen(Draft(kind, room, author, text, seq), v.text)


# -- HTTP ------------------------------------------------------------------------


async def _changer(request: Request, room: str, body: dict[str, Any]) -> tuple[str | None, str]:
    """Whose messages the caller may change (None: any, an API key or a moderator
    of the room) and its rate bucket's identity."""
    given = v.body_author(body, None)  # checked even where it is not used
    key = api_key(request)
    if key is not None:
        return None, key_caller(request, key)
    identity = identify(request)
    identity.check_room(room)
    return changed_by(identity, room, given), identity.bucket


def changed_by(identity: Identity, room: str, given: Any) -> str | None:
    """Whose messages ``identity`` may change in ``room`` (already checked readable):
    any (None) for a moderator of the room, else the token's sub, in open mode the
    ``author`` given. A change is a write: without the ``moderate`` grant it needs
    post rights in the room, so a read-only grant is refused (403) as a post is."""
    if identity.may_moderate(room):
        return None
    identity.check_post(room)
    return identity.name if identity.user else v.author(given)


async def edit_message(request: Request) -> Response:
    return await _change_message(request, edit=True)


async def delete_message(request: Request) -> Response:
    return await _change_message(request, edit=False)


async def _change_message(request: Request, *, edit: bool) -> Response:
    """An edit (body ``{"text"}``) or a delete (body optional): the text is checked
    before anything is taken (a rate token) or changed; an edit by a user (not a
    backend's own) is put to the edit hook."""
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    seq = v.message_seq(request.path_params["seq"])
    stored_room(gw, room, "changing a message")
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    key = v.idempotency_key(request.headers.get("idempotency-key"))
    schema = v.EDIT_MESSAGE if edit else v.DELETE_MESSAGE
    body = await v.json_body(request, gw.settings.max_body_bytes, schema, optional=not edit)
    text = v.text(body.get("text")) if edit else None
    author, bucket = await _changer(request, room, body)
    decision = await gw.rates.check_post(room, bucket)
    await gw.moderation.check_change(room, author, edit=edit)
    if text is not None and api_key(request) is None:  # a backend's own edit is not put to its hook
        editor = author if author is not None else identify(request).name
        text = await screened(gw, Kind.EDIT, room, editor, text, seq=seq)
    msg = await gw.chat.change(
        room, seq, text, author=author, idempotency_key=None if key is None else (bucket, key)
    )
    return encoded_json_response(msg.to_json(), 200, decision.headers())


def reader(identity: Identity, given: dict[str, Any], whose: str = "read position") -> str:
    """Whose read position (or other ``whose``): the token's sub; in open mode the ``user``
    given (required there). A ``user`` given (even null) is checked in auth mode
    too, as ``?user=`` elsewhere."""
    name = given_user(given)
    if identity.user:
        return identity.name
    if name is None:
        raise ApiError(
            "invalid_request",
            f"user is required in open mode: whose {whose} this is",
            field="user",
        )
    return name


def given_user(given: dict[str, Any]) -> str | None:
    """The ``user`` given (None when absent), checked as an author's name (422 with
    field ``user``) wherever it is given, also where it is not used."""
    name = None
    if "user" in given:
        value = given["user"]
        if not isinstance(value, str):
            raise ApiError(
                "invalid_request",
                f"user must be a string of 1..{v.MAX_AUTHOR} characters",
                field="user",
            )
        try:
            name = v.author(value)
        except ApiError as exc:
            raise ApiError(
                "invalid_request", exc.message.replace("author", "user", 1), field="user"
            ) from None
    return name


async def mark_read(request: Request) -> Response:
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    identity = identify(request)
    identity.check_room(room)
    stored_room(gw, room, "a read position")
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    body = await v.json_body(request, gw.settings.max_body_bytes, v.MARK_READ)
    seq = v.seq_field(body.get("seq"), "seq")
    if seq is None:
        raise ApiError("invalid_request", "seq is required", field="seq")
    user = reader(identity, body)
    decision = await gw.rates.check(READ, identity.bucket)
    await gw.moderation.check_read(room, user)
    pos = await gw.chat.mark_read(user, room, seq)
    return json_response(position_json(pos), headers=decision.headers())


async def read_position(request: Request) -> Response:
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    identity = identify(request)
    identity.check_room(room)
    stored_room(gw, room, "a read position")
    v.only_fields(dict(request.query_params), v.fields(v.READ_QUERY))
    user = reader(identity, dict(request.query_params))
    await gw.moderation.check_read(room, user)
    return json_response(position_json(await gw.store.read_position(user, room)))


async def read_positions(request: Request) -> Response:
    gw = gateway_of(request)
    identity = identify(request)
    v.only_fields(dict(request.query_params), v.fields(v.READ_QUERY))
    user = reader(identity, dict(request.query_params))
    # Filtered in the query: a limit applied first would hide granted rooms
    # behind a thousand others.
    found = await gw.store.read_positions(user, rooms=identity.readable())
    barred = set(await gw.moderation.excluded(user))  # rooms the user is banned from
    positions = [p for p in found if identity.may_access(p.room) and p.room not in barred]
    return json_response({"rooms": [position_json(p) for p in positions]})


def _message_of(request: Request, activity: str) -> tuple[Services, str, int, Identity]:
    """The path's room and message seq, for a caller granted the room, which must be a
    stored one (``activity`` says what was refused otherwise)."""
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    seq = v.message_seq(request.path_params["seq"])
    identity = identify(request)
    identity.check_room(room)
    stored_room(gw, room, activity)
    return gw, room, seq, identity


async def react(request: Request) -> Response:
    """``POST .../reactions`` (body ``{"reaction"}``) and ``DELETE
    .../reactions/{reaction}``: the caller's own reaction, added once or removed.
    A write: a read-only grant is refused, as are a banned or muted user."""
    gw, room, seq, identity = _message_of(request, "reacting to a message")
    add = request.method == "POST"
    if add:
        v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
        given = await v.json_body(request, gw.settings.max_body_bytes, v.REACT)
        reaction = v.reaction(given.get("reaction"))
    else:
        given = dict(request.query_params)
        v.only_fields(given, v.fields(v.REACT_QUERY))
        reaction = v.reaction(request.path_params["reaction"])
    identity.check_post(room)
    user = reader(identity, given, "reaction")
    decision = await gw.rates.check(REACT, identity.bucket)
    await gw.moderation.check_change(room, user, edit=True)
    msg = await gw.chat.react(room, seq, user, reaction, add=add)
    return encoded_json_response(msg.to_json(), 200, decision.headers())


async def message(request: Request) -> Response:
    """``/v1/rooms/{room}/messages/{seq}``: one route for both methods, so that a
    request with another method gets 405 with every method of the path in ``Allow``."""
    return await (edit_message if request.method == "PATCH" else delete_message)(request)


async def read(request: Request) -> Response:
    """``/v1/rooms/{room}/read``: one route for both methods, as ``message``."""
    return await (mark_read if request.method == "POST" else read_position)(request)


async def replies(request: Request) -> Response:
    """``GET .../messages/{seq}/replies?after=&limit=``: the replies to a message,
    ascending by seq, read as history is (the same grants and bans). A deleted
    message's replies answer 404 as the message is gone; each reply that was deleted
    is its tombstone (no text)."""
    gw, room, seq, identity = _message_of(request, "reading replies")
    q = request.query_params
    v.only_fields(dict(q), v.fields(v.REPLIES_QUERY))
    limit = v.limit_param(q.get("limit"))
    after = v.seq_param(q.get("after"), "after")
    await gw.moderation.check_read(room, known_user(identity))
    try:
        page = await gw.store.replies(room, seq, after=after, limit=limit)
    except (MessageNotFound, MessageDeleted) as exc:
        raise ApiError("not_found", str(exc)) from None
    body = b'{"messages":[%s],"has_more":%s,"next":%s}' % (
        b",".join([m.to_json() for m in page.messages]),
        b"true" if page.has_more else b"false",
        b"%d" % page.messages[-1].seq if page.has_more and page.messages else b"null",
    )
    return encoded_json_response(body)


async def versions(request: Request) -> Response:
    """``GET .../messages/{seq}/versions``: the earlier texts of an edited message, for
    its author, a moderator of the room or an API key (403 for anyone else). A
    deleted message has none left: 404, as for its replies."""
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    seq = v.message_seq(request.path_params["seq"])
    given = dict(request.query_params)
    v.only_fields(given, v.fields(v.READ_QUERY))
    given_user(given)  # checked whoever asks
    who: str | None = None  # None: any message's (an API key, a moderator)
    if api_key(request) is None:
        identity = identify(request)
        identity.check_room(room)
        if not identity.may_moderate(room):
            who = reader(identity, given, "versions (the message's author)")
    stored_room(gw, room, "reading versions")
    if who is not None:
        await gw.moderation.check_read(room, who)
    try:
        msg, found = await gw.store.versions(room, seq)
    except (MessageNotFound, MessageDeleted) as exc:
        raise ApiError("not_found", str(exc)) from None
    if who is not None and who != msg.author:
        raise ApiError(
            "forbidden",
            "only the message's author, a moderator of the room or an API key "
            "may read its earlier versions",
        )
    return json_response(
        {
            "room": room,
            "seq": seq,
            "version": msg.version,
            "versions": [f.to_dict() for f in found],
        }
    )
