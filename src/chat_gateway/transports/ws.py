"""The WebSocket endpoint: JSON text frames, one reader and one writer per socket.

The reader handles client frames in order. Consecutive publish frames are
handed to a per-connection publisher that commits, in order, all those that
arrived while the previous commit ran, in one statement (a publish with an
idempotency key goes on its own, through the idempotent post); any other frame
first waits for the publishes before it, so every answer (ack, error, pong,
subscribed) keeps the order of the frames that caused it. Frames go out
through the subscriber: straight to the socket under the gateway's own server,
else through its bounded queue drained by one writer task. When the reader
ends, or the hub closes the subscriber (slow consumer 1013, token expiry 1008,
shutdown 1001), the socket is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, NamedTuple

import orjson
from starlette.types import Message as ASGIMessage
from starlette.websockets import WebSocket, WebSocketDisconnect

from chat_gateway.access.auth import Identity
from chat_gateway.access.ratelimit import REACT, READ, SUBSCRIBE
from chat_gateway.api import validation as v
from chat_gateway.api.caller import gateway_of, stored_room
from chat_gateway.api.chat import changed_by, position_json, screened
from chat_gateway.core.namespaces import RoomKind
from chat_gateway.delivery.hub import WS, Subscriber
from chat_gateway.delivery.output import FrameSink
from chat_gateway.delivery.publish_hook import Kind
from chat_gateway.errors import (
    CLOSE_POLICY_VIOLATION,
    ApiError,
    internal,
    store_unavailable,
    wrong_room_kind,
)
from chat_gateway.services import Services
from chat_gateway.storage import Message, StoreUnavailable
from chat_gateway.transports.connections import Connection, connecting, expire_with_token

log = logging.getLogger("gateway.ws")

FRAME_FIELDS = {kind: v.fields(schema) for kind, schema in v.FRAMES.items()}
# What a chat frame does, for a refusal in a room that stores nothing.
_OPERATIONS = {
    "read": "a read position",
    "react": "reacting to a message",
    "unreact": "reacting to a message",
}
CHAT_FRAMES = {"edit", "delete", "typing", "read", "react", "unreact"}  # chat_gateway.api.chat


async def websocket_endpoint(websocket: WebSocket) -> None:
    gw = gateway_of(websocket)
    try:
        v.only_fields(dict(websocket.query_params), v.fields(v.WS_QUERY))
        identity, user = connecting(websocket)
        connection = Connection(gw, identity.bucket)
        decision = await connection.admit()
    except ApiError as exc:
        await refuse(websocket, exc)
        return
    try:
        await websocket.accept(
            headers=[(k.lower().encode(), v.encode()) for k, v in decision.headers().items()]
        )
        # The handshake's request headers were read (identity, rate, presence); an idle
        # socket need not keep them for its lifetime.
        websocket.scope["headers"].clear()
        await Session(gw, websocket, identity, user).run(connection)
    finally:
        await connection.close()


async def refuse(websocket: WebSocket, exc: ApiError) -> None:
    """Refuse the upgrade with an HTTP error body, or close 1008 if the server cannot."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(exc.response())
    else:  # pragma: no cover - servers without the denial-response extension
        await websocket.close(CLOSE_POLICY_VIOLATION, exc.message[:120])


def refusal(exc: Exception) -> ApiError:
    """What a failed frame is answered with: its own refusal, the store's, or
    ``internal`` (logged)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, StoreUnavailable):
        return store_unavailable(exc, "a WebSocket frame")
    log.error("unhandled error on a WebSocket frame", exc_info=exc)
    return internal()


class Publish(NamedTuple):
    """A checked publish frame, waiting for its commit."""

    ref: Any
    room: str
    author: str
    text: str
    key: str | None  # idempotency key
    reply_to: int | None = None
    mentions: tuple[str, ...] = ()

    @property
    def alone(self) -> bool:
        """Committed on its own (not in a run of plain posts): keyed, a reply, or
        with mentions."""
        return self.key is not None or self.reply_to is not None or bool(self.mentions)


class Session:
    """One WebSocket's frames in and out, from its upgrade to its close."""

    # Held for as long as the socket is open, and idle sockets are many.
    __slots__ = ("connection", "gw", "identity", "publisher", "publishes", "sub", "user", "ws")

    def __init__(
        self,
        gw: Services,
        websocket: WebSocket,
        identity: Identity,
        user: str | None = None,
    ) -> None:
        self.gw = gw
        self.ws = websocket
        self.identity = identity
        self.user = user  # the name shown in presence; None: not shown
        s = gw.settings
        # Under the gateway's own server, frames go straight to the socket (no writer task).
        self.sub = Subscriber(
            WS,
            identity=identity.name,
            max_messages=s.queue_max_messages,
            max_bytes=s.queue_max_bytes,
            sink=FrameSink.of(websocket.scope, gw.output),
            user=user,
        )
        self.publishes: list[tuple[dict[str, Any], Any]] = []
        self.publisher: asyncio.Task[None] | None = None
        self.connection: Connection | None = None

    async def run(self, connection: Connection) -> None:
        """Serve the socket until it closes; ``connection`` (admitted) holds its place."""
        self.connection = connection
        connection.attach(self.sub, self.identity)
        try:
            if self.sub.sink is not None:
                await self.read_until_closed(self.sub.sink)
            else:
                tasks = [
                    asyncio.create_task(self.read_loop()),
                    asyncio.create_task(self.sub.closed.wait()),
                    asyncio.create_task(self.write_loop()),
                ]
                try:
                    await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            if self.sub.sink is not None:
                self.sub.sink.on_close = None
            if self.publisher is not None:
                self.publisher.cancel()
                await asyncio.gather(self.publisher, return_exceptions=True)
            await connection.close()
            if self.sub.sink is not None:
                self.sub.sink.flush()
            if self.sub.close_code is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self.ws.close(self.sub.close_code, self.sub.close_reason[:120]), 2.0
                    )

    async def read_until_closed(self, sink: FrameSink) -> None:
        """With direct output (``sink``) the handler's own task is the reader (no task
        per socket is spent on writing or on waiting): the hub closing the subscriber
        cancels it."""
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a WebSocket session runs in a task")
        sink.on_close = task.cancel
        if self.sub.close_code is not None:
            return
        try:
            # read_loop's loop, inline: one coroutine frame less held per idle socket.
            while await self.take(await self.ws.receive()):
                pass
        except asyncio.CancelledError:
            sink.on_close = None
            if self.sub.close_code is None or task.uncancel() > 0:
                raise  # not (only) the hub's doing

    async def write_loop(self) -> None:
        async for batch in self.sub.batches():
            for frame in batch:
                await self.ws.send_text(frame.decode())

    async def read_loop(self) -> None:
        # One call per frame: a socket waiting for its next frame holds nothing of
        # the last one (its message, text and parsed frame), idle sockets being many.
        while await self.take(await self.ws.receive()):
            pass

    async def take(self, message: ASGIMessage) -> bool:
        """Handle one received message; False once the socket is gone."""
        if message["type"] == "websocket.disconnect":
            if self.connection is not None:
                self.connection.peer_code = message.get("code")
            return False
        raw = message.get("text")
        if raw is None:
            self.error(
                ApiError("invalid_request", "binary frames are not accepted; send JSON text frames")
            )
            return True
        ref = None
        try:
            frame = v.json_object(raw, "a frame")
            with contextlib.suppress(ApiError):  # an invalid ref is not echoed
                ref = v.ref(frame.get("ref"))
            if frame.get("type") == "publish":
                self.publishes.append((frame, ref))
                if self.publisher is None:
                    self.publisher = asyncio.create_task(self.publish_loop())
                return True
            if self.publisher is not None:
                await asyncio.wait([self.publisher])
            await self.handle(frame)
        except WebSocketDisconnect:
            return False
        except Exception as exc:
            self.error(refusal(exc), ref)
        return True

    async def publish_loop(self) -> None:
        """Commit queued publishes in order, each run of valid ones in one go."""
        try:
            while self.publishes:
                batch, self.publishes = self.publishes, []
                ready: list[Publish] = []
                for frame, ref in batch:
                    try:
                        ready.append(await self.prepare_publish(frame))
                    except Exception as exc:
                        await self.commit(ready)
                        ready = []
                        self.error(refusal(exc), ref)
                await self.commit(ready)
        finally:
            self.publisher = None

    async def prepare_publish(self, frame: dict[str, Any]) -> Publish:
        v.only_fields(frame, FRAME_FIELDS["publish"])
        ref = v.ref(frame.get("ref"))
        room = v.room_name(frame.get("room"))
        text = v.text(frame.get("text"))
        key = v.idempotency_key(frame.get("key"), "key")
        reply_to = v.reply_to(frame.get("reply_to", v.ABSENT))
        mentions = v.mentions(frame.get("mentions", v.ABSENT))
        author = self.identity.name if self.identity.user else v.author(frame.get("author"))
        self.identity.check_post(room)
        stored_room(self.gw, room, "publishing a message (emit an event instead)")
        await self.gw.rates.check_post(room, self.identity.bucket)
        await self.gw.moderation.check_post(
            room, author, moderator=self.identity.may_moderate(room)
        )
        text = await screened(self.gw, Kind.PUBLISH, room, author, text)
        return Publish(ref, room, author, text, key, reply_to, mentions)

    async def commit(self, ready: list[Publish]) -> None:
        """Commit in order: runs of plain keyless publishes together, a keyed one (or
        a reply, or one with mentions) on its own through the idempotent post (a
        repeat is acked with the first message)."""
        run: list[Publish] = []
        for p in ready:
            if not p.alone:
                run.append(p)
                continue
            await self.commit_run(run)
            run = []
            try:
                msg, _ = await self.gw.publisher.post(
                    p.room,
                    p.author,
                    p.text,
                    identity=self.identity,
                    transport="ws",
                    idempotency_key=p.key,
                    reply_to=p.reply_to,
                    mentions=p.mentions,
                )
            except (ApiError, StoreUnavailable) as exc:
                self.error(refusal(exc), p.ref)
                continue
            self.ack(p.ref, msg)
        await self.commit_run(run)

    async def commit_run(self, run: list[Publish]) -> None:
        if not run:
            return
        try:
            msgs = await self.gw.publisher.post_many(
                [(p.room, p.author, p.text) for p in run], transport="ws"
            )
        except (ApiError, StoreUnavailable) as exc:
            refused = refusal(exc)
            for p in run:
                self.error(refused, p.ref)
            return
        for p, msg in zip(run, msgs, strict=True):
            if isinstance(msg, ApiError):
                self.error(msg, p.ref)
            else:
                self.ack(p.ref, msg)

    def ack(self, ref: Any, msg: Message) -> None:
        self.sub.push(
            b'{"type":"ack","ref":%s,"message":%s}' % (orjson.dumps(ref), msg.to_json()), reply=True
        )

    async def handle_chat(self, kind: str, frame: dict[str, Any]) -> None:
        """``edit`` / ``delete`` (answered with an ack like a publish; ``key`` as the
        Idempotency-Key header on PATCH/DELETE), ``typing`` (no answer) and ``read``
        (answered with the position)."""
        ref = v.ref(frame.get("ref"))
        room = v.room_name(frame.get("room"))
        self.identity.check_room(room)
        chat = self.gw.chat
        if kind == "typing":
            self.identity.check_post(room)  # typing is writing: not on a read-only grant
            if not self.sub.holds(room):
                raise ApiError(
                    "invalid_request", "subscribe to the room before typing in it", field="room"
                )
            if self.user is None:
                raise ApiError(
                    "invalid_request",
                    "typing needs a name: connect with ?user=NAME in open mode",
                    field="user",
                )
            await self.gw.moderation.check_typing(room, self.user)
            await chat.typing(room, self.user)
            return
        stored_room(self.gw, room, _OPERATIONS.get(kind, "changing a message"))
        seq_value = v.seq_field(frame.get("seq"), "seq")  # a JSON number, as since is
        if kind == "react" or kind == "unreact":
            reaction = v.reaction(frame.get("reaction"))
            self.identity.check_post(room)  # a reaction is a write: not on a read-only grant
            user = self.named("a reaction")
            await self.gw.rates.check(REACT, self.identity.bucket)
            await self.gw.moderation.check_change(room, user, edit=True)
            msg = await chat.react(
                room, v.message_seq(seq_value), user, reaction, add=kind == "react"
            )
            self.ack(ref, msg)
            return
        if kind == "read":
            seq = seq_value
            if seq is None:
                raise ApiError("invalid_request", "seq is required", field="seq")
            user = self.named("a read position")
            await self.gw.rates.check(READ, self.identity.bucket)
            await self.gw.moderation.check_read(room, user)
            pos = await chat.mark_read(user, room, seq)
            self.sub.reply({"type": "ack", "ref": ref, "read": position_json(pos)})
            return
        seq = v.message_seq(seq_value)
        text = v.text(frame.get("text")) if kind == "edit" else None
        key = v.idempotency_key(frame.get("key"), "key")
        author = changed_by(self.identity, room, frame.get("author"))
        await self.gw.rates.check_post(room, self.identity.bucket)
        await self.gw.moderation.check_change(room, author, edit=text is not None)
        if text is not None:
            editor = author if author is not None else self.identity.name
            text = await screened(self.gw, Kind.EDIT, room, editor, text, seq=seq)
        # The rate bucket's identity owns the key, as on HTTP: the two share keys.
        msg = await chat.change(
            room,
            seq,
            text,
            author=author,
            idempotency_key=None if key is None else (self.identity.name, key),
        )
        self.ack(ref, msg)

    def named(self, what: str) -> str:
        """Who acts: the token's sub, in open mode the connection's ``?user=``
        (``what`` needs one: refused without it)."""
        if self.identity.user:
            return self.identity.name
        if self.user is not None:
            return self.user
        raise ApiError(
            "invalid_request",
            f"{what} needs a name: connect with ?user=NAME in open mode",
            field="user",
        )

    def check_subscription_room(self, room: str) -> None:
        """Refuse a new room past ``MAX_SUBSCRIPTIONS_PER_CONNECTION`` (a re-subscribe
        to a held room takes no new place)."""
        cap = self.gw.settings.max_subscriptions_per_connection
        if not self.sub.holds(room) and len(self.sub.rooms()) >= cap:
            raise ApiError(
                "too_many_subscriptions",
                f"this connection already holds {cap} rooms; unsubscribe from one first",
                limit=cap,
            )

    def error(self, exc: ApiError, ref: Any = None) -> None:
        self.sub.reply(exc.frame(ref))

    async def handle(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if not isinstance(kind, str) or kind not in FRAME_FIELDS:
            raise ApiError(
                "invalid_request", "type must be one of: " + ", ".join(FRAME_FIELDS), field="type"
            )
        v.only_fields(frame, FRAME_FIELDS[kind])
        hub, presence = self.gw.hub, self.gw.presence
        if kind == "ping":
            ref = v.ref(frame.get("ref"))
            self.sub.reply({"type": "pong"} if ref is None else {"type": "pong", "ref": ref})
        elif kind == "subscribe":
            room = v.room_name(frame.get("room"))
            since = v.seq_field(frame.get("since"), "since")
            changes_since = v.seq_field(frame.get("changes_since"), "changes_since")
            self.identity.check_room(room)
            self.check_subscription_room(room)
            await self.gw.rates.check(SUBSCRIBE, self.identity.bucket)
            await self.gw.moderation.check_subscribe(room, self.user)
            await hub.subscribe(self.sub, room, since, changes_since)
            await presence.joined(self.sub.id, self.user, room)
        elif kind == "unsubscribe":
            room = v.room_name(frame.get("room"))
            await hub.unsubscribe(self.sub, room)
            await presence.left(self.sub.id, room)
            self.sub.reply({"type": "unsubscribed", "room": room})
        elif kind == "refresh":
            await self.refresh(frame)
        elif kind == "emit":
            await self.emit(frame)
        elif kind in CHAT_FRAMES:
            await self.handle_chat(kind, frame)
        else:
            await self.commit([await self.prepare_publish(frame)])

    async def emit(self, frame: dict[str, Any]) -> None:
        """An event to every subscriber of an ephemeral room, stored nowhere; acked
        with ``{"type": "ack", "ref"}``. Refused where the namespace is of another
        kind (409 ``wrong_room_kind``) or takes publishes from API keys only (403);
        bans, mutes, slow mode and the namespace's post bucket apply as to a post."""
        ref = v.ref(frame.get("ref"))
        room = v.room_name(frame.get("room"))
        event = v.event_name(frame.get("event"))
        data = v.event_data(frame.get("data", v.ABSENT))
        self.identity.check_post(room)
        namespace = self.gw.settings.namespaces_file.of(room)
        if namespace.kind is not RoomKind.EPHEMERAL:
            raise wrong_room_kind(room, namespace.kind.value, "emitting an event (publish instead)")
        if not namespace.client_publish:
            raise ApiError(
                "forbidden",
                f"only API keys publish in {room!r} (client_publish = false in its namespace)",
            )
        await self.gw.rates.check_post(room, self.identity.bucket)
        user = self.identity.name if self.identity.user else self.user
        if user is not None:
            await self.gw.moderation.check_post(
                room, user, moderator=self.identity.may_moderate(room)
            )
        await self.gw.publisher.publish_event(room, event, data)
        self.sub.reply({"type": "ack", "ref": ref})

    async def refresh(self, frame: dict[str, Any]) -> None:
        """Replace the connection's token in band: same ``sub`` (another one closes the
        socket 1008), its expiry moves, and rooms it no longer grants are left."""
        ref = v.ref(frame.get("ref"))
        token = frame.get("token")
        if not isinstance(token, str) or not token:
            raise ApiError("invalid_request", "token must be a non-empty string", field="token")
        auth = self.gw.auth
        if auth.open_mode:
            raise ApiError("invalid_request", "there are no tokens to refresh in open mode")
        await auth.await_key(token)
        identity = auth.user(token, self.identity.name)  # refused: an error frame, token kept
        if identity.name != self.identity.name:
            log.info("websocket refresh with another sub", extra={"sub": self.sub.id})
            self.sub.close(CLOSE_POLICY_VIOLATION, "the new token is for another user")
            return
        self.identity = identity
        expire_with_token(self.sub, identity)
        hub, presence = self.gw.hub, self.gw.presence
        for room in [r for r in self.sub.rooms() if not identity.may_access(r)]:
            await hub.unsubscribe(self.sub, room)
            await presence.left(self.sub.id, room)
            self.sub.reply(
                {
                    "type": "unsubscribed",
                    "room": room,
                    "reason": "the new token does not grant this room",
                }
            )
        answer: dict[str, Any] = {"type": "refreshed", "exp": identity.exp}
        if ref is not None:
            answer["ref"] = ref
        self.sub.reply(answer)
