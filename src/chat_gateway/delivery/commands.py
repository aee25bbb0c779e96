"""Server API commands that act on every instance, carried by the broker's control channel.

A route of the server API (chat_gateway.api.server) sends a command with
``Control.send``; the broker hands it to every instance sharing it, the
sending one included (Redis: the control channel every subscriber link holds;
memory: in process), and each applies it to its own connections. One worker
per instance applies commands in the order they arrive.

- ``Disconnect(user, reason)``: every connection of the user is closed; a
  WebSocket with close code 4001 (``CLOSE_DISCONNECTED``) and the reason, an
  SSE stream after a last ``event: disconnected``.
- ``Unsubscribe(user, room, reason)``: a WebSocket of the user leaves the room
  and gets ``{"type": "unsubscribed", "room", "reason"}``; an SSE stream of the
  user on the room ends after ``event: unsubscribed``.
- ``Purged(room)``: the room's history was purged; the instance drops its
  cached window of it and tells the room's subscribers (``history_purged``).
- ``Moderated(room, user, action)``: a moderation action committed
  (chat_gateway.delivery.moderation); the instance forgets the room's cached
  restrictions, and for a ban ends the user's subscriptions to the room as
  ``Unsubscribe`` with reason ``banned`` does.

Delivery is what the broker gives: at most once, to the instances whose link
is up. A backend that got 202 while an instance was cut off from Redis may
repeat the call: every command is idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from chat_gateway.core.frames import sse_event
from chat_gateway.delivery.hub import SSE, WS, Hub
from chat_gateway.delivery.moderation import Moderation
from chat_gateway.delivery.presence import Presence
from chat_gateway.errors import CLOSE_DISCONNECTED, CLOSE_NORMAL
from chat_gateway.pubsub import Broker
from chat_gateway.storage import HistoryCache
from chat_gateway.storage.moderation import BANNED

log = logging.getLogger("gateway.control")

# Commands waiting to be applied on this instance; past this they are dropped
# (logged): a flood of commands must not grow memory without bound.
MAX_QUEUED = 10_000


@dataclass(frozen=True, slots=True)
class Disconnect:
    user: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    user: str
    room: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Purged:
    room: str


@dataclass(frozen=True, slots=True)
class Moderated:
    room: str
    user: str | None
    action: str


Command = Disconnect | Unsubscribe | Purged | Moderated
_KINDS: dict[str, type[Any]] = {
    "disconnect": Disconnect,
    "unsubscribe": Unsubscribe,
    "purged": Purged,
    "moderated": Moderated,
}
_NAMES = {cls: name for name, cls in _KINDS.items()}


class BadCommand(ValueError):
    """A control message this version cannot read."""


def encode(command: Command) -> bytes:
    return orjson.dumps({"op": _NAMES[type(command)], **asdict(command)})


def decode(data: bytes) -> Command:
    try:
        fields = orjson.loads(data)
        kind = _KINDS[fields.pop("op")]
        return kind(**fields)  # type: ignore[no-any-return]
    except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError) as exc:
        raise BadCommand(f"unreadable control message: {data[:200]!r}") from exc


def purged_frame(transport: str, event: dict[str, Any]) -> bytes:
    """The ``history_purged`` notice as the transport sends it."""
    if transport == WS:
        return orjson.dumps({"type": "history_purged", **event})
    return sse_event("history_purged", orjson.dumps(event))


class Control:
    def __init__(
        self,
        broker: Broker,
        hub: Hub,
        presence: Presence,
        history: HistoryCache,
        moderation: Moderation,
    ) -> None:
        self.broker = broker
        self.hub = hub
        self.presence = presence
        self.history = history
        self.moderation = moderation
        self._queue: asyncio.Queue[Command] = asyncio.Queue(MAX_QUEUED)
        self._worker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.broker.on_control(self._received)
        self._worker = asyncio.create_task(self._run(), name="control")

    async def close(self) -> None:
        self.broker.on_control(None)
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    async def send(self, command: Command) -> None:
        """To every instance; raises ``BrokerUnavailable`` when it could not be sent."""
        await self.broker.publish_control(encode(command))

    def _received(self, data: bytes) -> None:
        try:
            command = decode(data)
        except BadCommand as exc:
            log.warning("%s", exc)
            return
        try:
            self._queue.put_nowait(command)
        except asyncio.QueueFull:
            log.warning("control command dropped: %d waiting", self._queue.qsize())

    async def _run(self) -> None:
        while True:
            command = await self._queue.get()
            try:
                await self.apply(command)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("control command %r failed", command)

    async def _unsubscribe(self, user: str, room: str, reason: str) -> None:
        """End ``user``'s subscriptions to ``room`` on this instance."""
        for sub in self.hub.of_user(user, room):
            if sub.transport == SSE:  # a stream is one room: it ends
                sub.farewell = sse_event(
                    "unsubscribed", orjson.dumps({"room": room, "reason": reason})
                )
                sub.close(CLOSE_NORMAL, reason)
                continue
            await self.hub.unsubscribe(sub, room)
            await self.presence.left(sub.id, room)
            sub.reply({"type": "unsubscribed", "room": room, "reason": reason})

    async def apply(self, command: Command) -> None:
        if isinstance(command, Disconnect):
            subs = self.hub.of_user(command.user)
            for sub in subs:
                if sub.transport == SSE:
                    sub.farewell = sse_event(
                        "disconnected", orjson.dumps({"reason": command.reason})
                    )
                sub.close(CLOSE_DISCONNECTED, command.reason)
            if subs:
                log.info(
                    "user disconnected by the server API",
                    extra={"user": command.user, "connections": len(subs)},
                )
        elif isinstance(command, Unsubscribe):
            await self._unsubscribe(command.user, command.room, command.reason)
        elif isinstance(command, Moderated):
            self.moderation.forget(command.room)
            if command.action == BANNED and command.user is not None:
                await self._unsubscribe(command.user, command.room, BANNED)
        elif isinstance(command, Purged):
            self.history.forget(command.room)
            self.hub.notify(command.room, purged_frame, {"room": command.room})
