"""The WebSocket endpoint: JSON text frames, one reader and one writer per socket.

The reader handles client frames in order. Consecutive publish frames are
handed to a per-connection publisher that commits, in order, all those that
arrived while the previous commit ran, in one statement; any other frame
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
from typing import Any

import orjson
from starlette.websockets import WebSocket, WebSocketDisconnect

from gateway import validation as v
from gateway.auth import Identity
from gateway.core import CONNECT, POST, SUBSCRIBE, Gateway
from gateway.edge import gateway_of, identify, presence_user
from gateway.errors import CLOSE_POLICY_VIOLATION, ApiError, internal
from gateway.hub import WS, Subscriber
from gateway.wsout import FrameSink
from storage import StoreUnavailable

log = logging.getLogger("gateway.ws")

FRAME_FIELDS = {kind: v.fields(schema) for kind, schema in v.FRAMES.items()}


async def websocket_endpoint(websocket: WebSocket) -> None:
    gw = gateway_of(websocket)
    try:
        if gw.closing:
            raise ApiError("unavailable", "the instance is shutting down; reconnect elsewhere")
        v.only_fields(dict(websocket.query_params), v.fields(v.WS_QUERY))
        identity = identify(websocket, query_token=True)
        user = presence_user(websocket, identity)
        decision = await gw.rate(CONNECT, identity.name)
        gw.limits.acquire(identity.name)
    except ApiError as exc:
        await refuse(websocket, exc)
        return
    try:
        await websocket.accept(headers=[(k.lower().encode(), v.encode())
                                        for k, v in decision.headers().items()])
        session = Session(gw, websocket, identity, user)
        await session.run()
    finally:
        gw.limits.release(identity.name)


async def refuse(websocket: WebSocket, exc: ApiError) -> None:
    """Refuse the upgrade with an HTTP error body, or close 1008 if the server cannot."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        await websocket.send_denial_response(exc.response())
    else:  # pragma: no cover - servers without the denial-response extension
        await websocket.close(CLOSE_POLICY_VIOLATION, exc.message[:120])


def expire_with_token(sub: Subscriber, identity: Identity) -> None:
    """Close the connection (1008 on WS, end of stream on SSE) when its token expires."""
    if identity.expires_at is not None:
        sub.close_at(identity.expires_at, CLOSE_POLICY_VIOLATION,
                     "the token has expired; reconnect with a new one")


class Session:
    def __init__(self, gw: Gateway, websocket: WebSocket, identity: Identity,
                 user: str | None = None) -> None:
        self.gw = gw
        self.ws = websocket
        self.identity = identity
        self.user = user  # the name shown in presence; None: not shown
        s = gw.settings
        # Under the gateway's own server, frames go straight to the socket (no writer task).
        self.sub = Subscriber(WS, identity=identity.name, max_messages=s.queue_max_messages,
                              max_bytes=s.queue_max_bytes, sink=FrameSink.of(websocket.scope))
        self.publishes: list[tuple[dict[str, Any], Any]] = []
        self.publisher: asyncio.Task[None] | None = None

    async def run(self) -> None:
        hub = self.gw.hub
        assert hub is not None
        presence = self.gw.presence
        assert presence is not None
        hub.register(self.sub)
        self.gw.metrics.connections.labels("ws").inc()
        log.info("websocket opened", extra={"sub": self.sub.id})
        expire_with_token(self.sub, self.identity)
        try:
            if self.sub.sink is not None:
                await self.read_until_closed()
            else:
                tasks = [asyncio.create_task(self.read_loop()),
                         asyncio.create_task(self.sub.closed.wait()),
                         asyncio.create_task(self.write_loop())]
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
            self.gw.metrics.connections.labels("ws").dec()
            await hub.unregister(self.sub)
            await presence.gone(self.sub.id)
            log.info("websocket closed", extra={"sub": self.sub.id,
                                                "close_code": self.sub.close_code})
            if self.sub.sink is not None:
                self.sub.sink.flush()
            if self.sub.close_code is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        self.ws.close(self.sub.close_code, self.sub.close_reason[:120]), 2.0)

    async def read_until_closed(self) -> None:
        """With direct output the handler's own task is the reader (no task per socket
        is spent on writing or on waiting): the hub closing the subscriber cancels it."""
        task = asyncio.current_task()
        assert task is not None and self.sub.sink is not None
        self.sub.sink.on_close = task.cancel
        if self.sub.close_code is not None:
            return
        try:
            await self.read_loop()
        except asyncio.CancelledError:
            self.sub.sink.on_close = None
            if self.sub.close_code is None or task.uncancel() > 0:
                raise  # not (only) the hub's doing

    async def write_loop(self) -> None:
        async for batch in self.sub.batches():
            for frame in batch:
                await self.ws.send_text(frame.decode())

    async def read_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                self.error(ApiError("invalid_request", "binary frames are not accepted; "
                                                       "send JSON text frames"))
                continue
            ref = None
            try:
                frame = v.json_object(raw, "a frame")
                with contextlib.suppress(ApiError):  # an invalid ref is not echoed
                    ref = v.ref(frame.get("ref"))
                if frame.get("type") == "publish":
                    self.publishes.append((frame, ref))
                    if self.publisher is None:
                        self.publisher = asyncio.create_task(self.publish_loop())
                    continue
                if self.publisher is not None:
                    await asyncio.wait([self.publisher])
                await self.handle(frame)
            except ApiError as exc:
                self.error(exc, ref)
            except StoreUnavailable:
                self.error(ApiError("unavailable", "the message store is unavailable; "
                                                   "retry later"), ref)
            except WebSocketDisconnect:
                return
            except Exception:  # noqa: BLE001 - one bad frame must not drop the socket
                log.exception("unhandled error on a WebSocket frame")
                self.error(internal(), ref)

    async def publish_loop(self) -> None:
        """Commit queued publishes in order, each run of valid ones in one go."""
        try:
            while self.publishes:
                batch, self.publishes = self.publishes, []
                ready: list[tuple[Any, str, str, str]] = []
                for frame, ref in batch:
                    try:
                        ready.append(await self.prepare_publish(frame))
                    except Exception as exc:  # noqa: BLE001 - answered on the frame's ref
                        if not isinstance(exc, ApiError):
                            log.exception("unhandled error on a WebSocket frame")
                            exc = internal()
                        await self.commit(ready)
                        ready = []
                        self.error(exc, ref)
                await self.commit(ready)
        finally:
            self.publisher = None

    async def prepare_publish(self, frame: dict[str, Any]) -> tuple[Any, str, str, str]:
        v.only_fields(frame, FRAME_FIELDS["publish"])
        ref = v.ref(frame.get("ref"))
        room = v.room_name(frame.get("room"))
        text = v.text(frame.get("text"))
        author = self.identity.name if self.identity.user else v.author(frame.get("author"))
        self.identity.check_room(room)
        await self.gw.rate(POST, self.identity.name)
        return ref, room, author, text

    async def commit(self, ready: list[tuple[Any, str, str, str]]) -> None:
        if not ready:
            return
        try:
            msgs = await self.gw.post_many([p[1:] for p in ready], transport="ws")
        except ApiError as exc:
            for p in ready:
                self.error(exc, p[0])
            return
        for (ref, *_), msg in zip(ready, msgs, strict=True):
            self.sub.push(b'{"type":"ack","ref":%s,"message":%s}' % (orjson.dumps(ref),
                                                                    msg.to_json()), reply=True)

    def check_subscription_room(self, room: str) -> None:
        """Refuse a new room past ``MAX_SUBSCRIPTIONS_PER_CONNECTION`` (a re-subscribe
        to a held room takes no new place)."""
        cap = self.gw.settings.max_subscriptions_per_connection
        if room not in self.sub.cursors and len(self.sub.cursors) >= cap:
            raise ApiError("too_many_subscriptions",
                           f"this connection already holds {cap} rooms; unsubscribe from "
                           "one first", limit=cap)

    def error(self, exc: ApiError, ref: Any = None) -> None:
        self.sub.reply(exc.frame(ref))

    async def handle(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if not isinstance(kind, str) or kind not in FRAME_FIELDS:
            raise ApiError("invalid_request", "type must be one of: "
                           + ", ".join(FRAME_FIELDS), field="type")
        v.only_fields(frame, FRAME_FIELDS[kind])
        hub, presence = self.gw.hub, self.gw.presence
        assert hub is not None and presence is not None
        if kind == "ping":
            ref = v.ref(frame.get("ref"))
            self.sub.reply({"type": "pong"} if ref is None else {"type": "pong", "ref": ref})
        elif kind == "subscribe":
            room = v.room_name(frame.get("room"))
            since = v.seq_field(frame.get("since"), "since")
            self.identity.check_room(room)
            self.check_subscription_room(room)
            await self.gw.rate(SUBSCRIBE, self.identity.name)
            await hub.subscribe(self.sub, room, since)
            await presence.joined(self.sub.id, self.user, room)
        elif kind == "unsubscribe":
            room = v.room_name(frame.get("room"))
            await hub.unsubscribe(self.sub, room)
            await presence.left(self.sub.id, room)
            self.sub.reply({"type": "unsubscribed", "room": room})
        else:
            await self.commit([await self.prepare_publish(frame)])
