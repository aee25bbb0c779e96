"""Chat on top of messages: edits and deletes, typing notices, read positions.

- An edit or delete commits in the store (which numbers it with the room's
  change counter and logs it), voids the room's cached window on every
  instance, then is published on the room's channel (``c:``) and sequenced by
  each hub after the messages committed before it (gateway.hub).
- Who may change a message: its author (the token's ``sub``; in open mode the
  ``author`` given, as on a post), a token whose ``moderate`` claim grants the
  room, or any holder of an API key, for any message. All count against the
  post bucket.
- The room's last change number is also raised in Redis (``{room}:change``)
  before the publish; every instance compares it with what it dispatched every
  ``POSITION_INTERVAL`` seconds and fills the rest from the store, so a lost
  publish still arrives (as a lost message does, by the seq key).
- Typing (``t:``) and read receipts (``r:``) are published on the room's
  channel, never stored. Typing passes at most once per user and room every
  ``TYPING_INTERVAL`` seconds, across instances (a Redis key set with NX and
  an expiry; per instance without Redis). A receipt goes out at most once per
  user and room every ``RECEIPT_DEBOUNCE`` seconds per instance, with the
  latest position.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway import validation as v
from gateway.auth import Identity, bearer, is_api_key
from gateway.core import POST, Gateway
from gateway.edge import encoded_json_response, gateway_of, identify, json_response
from gateway.errors import ApiError
from gateway.hub import wire_change
from gateway.periodic import every
from pubsub import BrokerUnavailable
from pubsub.script import Script
from storage import Message, MessageNotFound, NotAuthor, ReadPosition, StoreUnavailable

log = logging.getLogger("gateway.chat")

TYPING_INTERVAL = 2.0
RECEIPT_DEBOUNCE = 1.0
# Typing windows kept per instance without Redis; past it the expired ones go.
LOCAL_TYPING_MAX = 10_000


# KEYS: the room's change key; ARGV: number, ttl. Raised, never lowered.
_RAISE_CHANGE = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 1
"""


class Chat:
    """This instance's part of changes, typing and read receipts. ``start`` begins the
    change position check."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self._raise = None if gw.broker.redis is None else Script(gw.broker.redis, _RAISE_CHANGE)
        self._check: asyncio.Task[None] | None = None
        self._typing: dict[tuple[str, str], float] = {}  # without Redis: window ends
        self._receipts: dict[tuple[str, str], int] = {}  # waiting to go out: latest seq
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        if self._raise is not None:
            self._check = every(
                self.gw.settings.position_interval, self.check_changes, "change position check"
            )

    def _change_key(self, room: str) -> str:
        return f"{self.gw.settings.key_prefix}{{{room}}}:change"

    async def check_changes(self) -> None:
        """Fill every held room whose last change in Redis is ahead of what was dispatched."""
        hub = self.gw.hub
        assert hub is not None
        rooms = [r for r in hub.rooms.values() if r.seq is not None]
        if not rooms:
            return
        assert self.gw.history is not None
        # One MGET per thousand rooms over one Redis (HistoryCache.get_many).
        prefix = self.gw.settings.key_prefix  # the keys of _change_key, built inline
        values = await self.gw.history.get_many([f"{prefix}{{{r.name}}}:change" for r in rooms])
        for r, value in zip(rooms, values, strict=True):
            if isinstance(value, BaseException) or value is None:
                continue
            if int(value) > r.changes.last and r.changes.task is None:
                self.gw.metrics.gap_fills.labels("change_position").inc()
                hub.fill_changes(r)

    async def close(self) -> None:
        if self._check is not None:
            self._check.cancel()
            await asyncio.gather(self._check, return_exceptions=True)
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- edits and deletes ---------------------------------------------------

    async def change(
        self,
        room: str,
        seq: int,
        text: str | None,
        *,
        author: str | None,
        idempotency_key: tuple[str, str] | None = None,
    ) -> Message:
        """Edit (``text``) or delete (None) a message; ``author``: only theirs, None:
        any; ``idempotency_key``: ``(owner, key)``. Acknowledged once the store
        committed and the cache was voided."""
        gw = self.gw
        if gw.closing:
            raise ApiError("unavailable", "the instance is shutting down; retry on another")
        assert gw.history is not None and gw.hub is not None
        try:
            change, msg = await gw.store.change(
                room, seq, text, author=author, idempotency_key=idempotency_key
            )
        except MessageNotFound as exc:
            raise ApiError("not_found", str(exc)) from None
        except NotAuthor:
            raise ApiError(
                "forbidden",
                "only the message's author (or a moderator of the "
                "room, or an API key) may edit or delete it",
            ) from None
        except StoreUnavailable as exc:
            log.warning("change refused: %s", exc)
            raise ApiError(
                "unavailable", "the message store is unavailable; nothing was changed, retry later"
            ) from None
        if change is None:
            return msg  # nothing changed (a repeated delete, the same text)
        if gw.webhooks is not None:  # its events committed with it: send them now
            gw.webhooks.poke()
        await gw.history.changed(room)
        if self._raise is not None:
            try:
                await self._raise(
                    keys=[self._change_key(room)],
                    args=[change.change, gw.settings.history_cache_ttl],
                )
            except Exception as exc:
                log.warning("change position not raised: %r", exc)
        if gw.settings.fault_skip_publish:  # test-only: killed after commit
            return msg
        try:
            await gw.broker.publish(gw.hub.channel(room), wire_change(change))
        except BrokerUnavailable as exc:
            log.warning("live change lost, delivery falls back to the store: %s", exc)
        return msg

    # -- typing ----------------------------------------------------------------

    async def typing(self, room: str, user: str) -> None:
        """Tell the room's other subscribers that ``user`` types, unless they were
        told less than ``TYPING_INTERVAL`` ago; best effort, never an error."""
        gw = self.gw
        assert gw.hub is not None
        if not await self._typing_window(room, user):
            return
        try:
            await gw.broker.publish(
                gw.hub.channel(room),
                b"t:" + orjson.dumps({"type": "typing", "room": room, "user": user}),
            )
        except BrokerUnavailable as exc:
            log.debug("typing notice lost: %s", exc)

    async def _typing_window(self, room: str, user: str) -> bool:
        redis = self.gw.broker.redis
        guard = self.gw.broker.guard
        if redis is not None and (guard is None or guard.usable()):
            digest = hashlib.sha256(user.encode()).hexdigest()[:24]
            key = f"{self.gw.settings.key_prefix}typing:{{{room}}}:{digest}"
            try:
                return bool(await redis.set(key, b"1", nx=True, px=int(TYPING_INTERVAL * 1000)))
            except Exception as exc:
                log.debug("typing window not checked in Redis: %r", exc)
        now = time.monotonic()
        if len(self._typing) > LOCAL_TYPING_MAX:
            self._typing = {k: end for k, end in self._typing.items() if end > now}
        if self._typing.get((room, user), 0.0) > now:
            return False
        self._typing[(room, user)] = now + TYPING_INTERVAL
        return True

    # -- read positions ----------------------------------------------------------

    async def mark_read(self, user: str, room: str, seq: int) -> ReadPosition:
        pos = await self.gw.store.mark_read(user, room, seq)
        key = (room, user)
        self._receipts[key] = pos.seq
        if key not in self._timers:
            self._timers[key] = asyncio.get_running_loop().call_later(
                RECEIPT_DEBOUNCE, self._receipt_due, key
            )
        return pos

    def _receipt_due(self, key: tuple[str, str]) -> None:
        self._timers.pop(key, None)
        seq = self._receipts.pop(key, None)
        if seq is None:
            return
        task = asyncio.ensure_future(self._send_receipt(key[0], key[1], seq))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_receipt(self, room: str, user: str, seq: int) -> None:
        gw = self.gw
        assert gw.hub is not None
        try:
            await gw.broker.publish(
                gw.hub.channel(room),
                b"r:" + orjson.dumps({"type": "read", "room": room, "user": user, "seq": seq}),
            )
        except BrokerUnavailable as exc:
            log.debug("read receipt lost: %s", exc)


def chat_of(gw: Gateway) -> Chat:
    if gw.chat is None:
        raise ApiError("unavailable", "the instance is not started")
    return gw.chat  # type: ignore[no-any-return]


def position_json(pos: ReadPosition) -> dict[str, Any]:
    return {"room": pos.room, "seq": pos.seq, "unread": pos.unread}


# -- HTTP ------------------------------------------------------------------------


async def _changer(request: Request, room: str, body: dict[str, Any]) -> tuple[str | None, str]:
    """Whose messages the caller may change (None: any, an API key or a moderator
    of the room) and its rate bucket's identity."""
    gw = gateway_of(request)
    given = v.body_author(body, None)  # checked even where it is not used
    key = bearer(request.headers)
    if is_api_key(gw.auth, key):
        assert key is not None
        return None, "key:" + hashlib.sha256(key.encode()).hexdigest()[:24]
    identity = identify(request)
    identity.check_room(room)
    return changed_by(identity, room, given), identity.name


def changed_by(identity: Identity, room: str, given: Any) -> str | None:
    """Whose messages ``identity`` may change in ``room`` (already checked readable):
    any (None) for a moderator of the room, else the token's sub, in open mode the
    ``author`` given."""
    if identity.may_moderate(room):
        return None
    return identity.name if identity.user else v.author(given)


async def _body(
    request: Request, schema: dict[str, Any], *, optional: bool = False
) -> dict[str, Any]:
    gw = gateway_of(request)
    raw = await v.read_body(request, gw.settings.max_body_bytes)
    if optional and not raw.strip():
        return {}
    body = v.json_object(raw)
    v.only_fields(body, v.fields(schema))
    return body


async def edit_message(request: Request) -> Response:
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    seq = v.message_seq(request.path_params["seq"])
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    key = v.idempotency_key(request.headers.get("idempotency-key"))
    body = await _body(request, v.EDIT_MESSAGE)
    text = v.text(body.get("text"))
    author, bucket = await _changer(request, room, body)
    decision = await gw.rate(POST, bucket)
    msg = await chat_of(gw).change(
        room, seq, text, author=author, idempotency_key=None if key is None else (bucket, key)
    )
    return encoded_json_response(msg.to_json(), 200, decision.headers())


async def delete_message(request: Request) -> Response:
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    seq = v.message_seq(request.path_params["seq"])
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    key = v.idempotency_key(request.headers.get("idempotency-key"))
    body = await _body(request, v.DELETE_MESSAGE, optional=True)
    author, bucket = await _changer(request, room, body)
    decision = await gw.rate(POST, bucket)
    msg = await chat_of(gw).change(
        room, seq, None, author=author, idempotency_key=None if key is None else (bucket, key)
    )
    return encoded_json_response(msg.to_json(), 200, decision.headers())


def reader(identity: Identity, given: dict[str, Any]) -> str:
    """Whose read position: the token's sub; in open mode the ``user`` given (required
    there). A ``user`` given (even null) is checked in auth mode too, as ``?user=``
    elsewhere."""
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
    if identity.user:
        return identity.name
    if name is None:
        raise ApiError(
            "invalid_request",
            "user is required in open mode: whose read position this is",
            field="user",
        )
    return name


async def mark_read(request: Request) -> Response:
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    identity = identify(request)
    identity.check_room(room)
    v.only_fields(dict(request.query_params), v.fields(v.NO_QUERY))
    body = await _body(request, v.MARK_READ)
    seq = v.seq_field(body.get("seq"), "seq")
    if seq is None:
        raise ApiError("invalid_request", "seq is required", field="seq")
    user = reader(identity, body)
    pos = await chat_of(gw).mark_read(user, room, seq)
    return json_response(position_json(pos))


async def read_position(request: Request) -> Response:
    gw = gateway_of(request)
    room = v.room_name(request.path_params["room"])
    identity = identify(request)
    identity.check_room(room)
    v.only_fields(dict(request.query_params), v.fields(v.READ_QUERY))
    user = reader(identity, dict(request.query_params))
    return json_response(position_json(await gw.store.read_position(user, room)))


async def read_positions(request: Request) -> Response:
    gw = gateway_of(request)
    identity = identify(request)
    v.only_fields(dict(request.query_params), v.fields(v.READ_QUERY))
    user = reader(identity, dict(request.query_params))
    positions = [p for p in await gw.store.read_positions(user) if identity.may_access(p.room)]
    return json_response({"rooms": [position_json(p) for p in positions]})


async def message(request: Request) -> Response:
    """``/v1/rooms/{room}/messages/{seq}``: one route for both methods, so that a
    request with another method gets 405 with every method of the path in ``Allow``."""
    return await (edit_message if request.method == "PATCH" else delete_message)(request)


async def read(request: Request) -> Response:
    """``/v1/rooms/{room}/read``: one route for both methods, as ``message``."""
    return await (mark_read if request.method == "POST" else read_position)(request)
