"""The hub: this instance's connections, by id and by room, and in-order fan-out.

Delivery rests on one rule, applied everywhere a message reaches a subscriber:
a subscriber's cursor for a room is the last seq it was given, and a message
is handed over only if its seq is ``cursor + 1``. Live messages, gap fills,
resume replays and reconnect fills all pass through that rule, so none can
reorder or repeat what another delivered.

- A room's live stream is sequenced first, by its ``Sequencer``
  (:mod:`chat_gateway.core.sequencer`, which does no I/O; the hub is its shell:
  it feeds in broker payloads and store pages, and runs the timers and fills the
  sequencer asks for): a seq ahead of the next expected one is held for
  ``gap_wait`` seconds, then the gap is filled from the store (the truth). The
  same fill runs after a broker reconnect and when the periodic position check
  finds the room's latest seq ahead.
- A subscriber behind the room (resume with ``since``, or a message it missed
  while joining) gets a catch-up task that reads the store from its cursor
  until it reaches the room's position; live messages it already has are
  skipped by the rule.
- Each event is encoded once per transport and the same object is queued to
  every subscriber; the fan-out never awaits a socket. A subscriber whose
  bounded queue is full is closed as slow (1013) and resumes with ``since``.
  A transport that can write without awaiting gives its subscriber a ``sink``:
  frames then go straight to the socket's buffer (no queue, no writer task),
  and the bound is that buffer's size in bytes.

Edits and deletes (``c:`` payloads) follow the same rule with a second
counter, the room's change number (see docs/delivery.md): a room dispatches
change ``k`` after change ``k - 1`` and only once it has dispatched every
message up to the change's ``after_seq``; a subscriber takes it only if its
change cursor is the room's previous change and it holds those messages, else
its catch-up reads both logs from the store and interleaves them. A message
likewise waits until the room has dispatched the changes committed before it
(the count its payload carries), so the two go out in commit order. Typing and
read receipts (``t:``, ``r:``) are unsequenced, like ephemeral events.

A state room (``kind = "state"``) sequences its writes (``s:`` payloads) as
messages, but a fill reads the current keys after the position and moves past
seqs whose keys were written again (``Sequencer.state_page``). The room's values
are held here (``LiveState``), read once when the room opens and kept current by
each delivered write, and every subscription's snapshot or resume comes from
them, in the step that sets its cursor; so does a ``GET`` of the room's state
while the room's position is that of every write acknowledged
(``state_document``; else a read of the store shared by the GETs waiting,
chat_gateway.delivery.state_reads). A subscriber of a state or ephemeral room
with ``conflate_ms`` joins the room's group for that interval: one buffer of each
key's newest frame and one timer, flushed to the whole group (``_flush``).

Outside this module nothing reads a room's or a subscriber's fields: ask the hub
(``room_stats``, ``positions``, ``held_rooms``, ``connections``, ``of_user``) or the subscriber
(``holds``, ``rooms``, ``position``).

The hub sequences and dispatches; the payloads it reads are those of
:mod:`chat_gateway.core.wire`, and the frames it queues are built by :mod:`chat_gateway.core.frames`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple, TypeVar

import orjson

from chat_gateway import tracing
from chat_gateway.core import wire
from chat_gateway.core.conflation import ConflationBuffer
from chat_gateway.core.frames import SSE as SSE  # the transports a Subscriber speaks
from chat_gateway.core.frames import WS as WS
from chat_gateway.core.frames import (
    change_frame,
    chat_frame,
    event_frame,
    message_frame,
    presence_frame,
    snapshot_frame,
    state_document,
    state_frame,
)
from chat_gateway.core.namespaces import Namespaces, RoomKind
from chat_gateway.core.sequencer import Sequencer, Timer, merge
from chat_gateway.core.state import DOCUMENT, LiveState
from chat_gateway.delivery.primitives import Flag
from chat_gateway.delivery.state_reads import StateReads
from chat_gateway.errors import CLOSE_GOING_AWAY, CLOSE_TRY_AGAIN_LATER
from chat_gateway.metrics import Metrics
from chat_gateway.periodic import every
from chat_gateway.pubsub import Broker
from chat_gateway.storage import MAX_PAGE, Change, HistoryCache, StoreUnavailable
from chat_gateway.storage.records import StateEntry

log = logging.getLogger("gateway.hub")

# Live messages held while a gap is open; past this they are dropped and the
# fill reads them from the store instead, so a long outage cannot grow memory.
MAX_PENDING = 2000
# Every this many position checks, the rooms' positions are read from the store
# (one query for all) instead of Redis' seq keys: a commit whose seq raise and
# publish were both lost is in the store only.
STORE_CHECK_EVERY = 3

T = TypeVar("T")


class OncePerTransport:
    """A frame built on first need for each transport, then the same bytes for every
    subscriber of that transport: how every dispatch of the hub encodes once."""

    __slots__ = ("_build", "_frames")

    def __init__(self, build: Callable[[str], bytes]) -> None:
        self._build = build
        self._frames: dict[str, bytes] = {}

    def __call__(self, transport: str) -> bytes:
        frame = self._frames.get(transport)
        if frame is None:
            frame = self._frames[transport] = self._build(transport)
        return frame


class Subscriber:
    """The outbound side of one connection: a bounded queue drained by one writer."""

    # SSE: the last event of a stream the server API ends, sent after the queue. A
    # class default, so the connections it is never set on carry nothing for it.
    farewell: bytes | None = None
    # Per room, the last change number given (edits and deletes); made on subscribe.
    ccursors: dict[str, int] | None = None

    def __init__(
        self,
        transport: str,
        *,
        identity: str = "",
        max_messages: int = 1000,
        max_bytes: int = 4 * 1024 * 1024,
        sink: Any = None,
        user: str | None = None,
    ) -> None:
        self.id = 0  # given by Hub.register: unique among the hub's connections
        self.transport = transport
        self.identity = identity
        # The user the server API addresses: the token's sub, or ?user= in open mode.
        self.user = user
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.cursors: dict[str, int] = {}
        self.catchups: dict[str, asyncio.Task[None]] = {}
        self.close_code: int | None = None
        self.close_reason = ""
        self.on_slow: Callable[[Subscriber], None] | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._queue: list[Any] = []
        self._bytes = 0
        self.closed = Flag()  # an asyncio.Event, lighter (chat_gateway.delivery.primitives)
        # Optional direct output (see chat_gateway.delivery.output.FrameSink): ``write(frame)`` returns
        # the bytes the socket still buffers, or -1 once it takes nothing more. With
        # it the queue and its events are never used, so they are not made (memory
        # per idle connection).
        self.sink = sink
        self._wakeup = asyncio.Event() if sink is None else None
        self._drained = asyncio.Event() if sink is None else None

    def __repr__(self) -> str:
        return f"<Subscriber {self.id} {self.transport}>"

    def push(self, item: bytes, *, reply: bool = False) -> bool:
        """Queue one encoded frame; closes the subscriber as slow when the queue is full.
        A ``reply`` (ack, error, pong) answers the client's own frame and is never
        held back to share a write (chat_gateway.delivery.output)."""
        if self.close_code is not None:
            return False
        if self.sink is not None:
            buffered = self.sink.write(item, hold=not reply)
            if buffered < 0:
                return False  # the socket is closing; its session is ending
            if buffered > self.max_bytes:
                self.close(CLOSE_TRY_AGAIN_LATER, "slow consumer: the send buffer is full")
                if self.on_slow is not None:
                    self.on_slow(self)
                return False
            return True
        size = len(item)
        if len(self._queue) >= self.max_messages or self._bytes + size > self.max_bytes:
            self.close(CLOSE_TRY_AGAIN_LATER, "slow consumer: the send queue is full")
            if self.on_slow is not None:
                self.on_slow(self)
            return False
        self._queue.append(item)
        self._bytes += size
        assert self._wakeup is not None
        self._wakeup.set()
        return True

    def reply(self, obj: Any) -> bool:
        return self.push(orjson.dumps(obj), reply=True)

    def holds(self, room: str) -> bool:
        """Subscribed to ``room``."""
        return room in self.cursors

    def rooms(self) -> list[str]:
        """The rooms it is subscribed to."""
        return list(self.cursors)

    def position(self, room: str) -> int | None:
        """The last seq of ``room`` it was given (None when not subscribed)."""
        return self.cursors.get(room)

    def close_at(self, deadline: float, code: int, reason: str) -> None:
        """Close with ``code`` at ``deadline`` (epoch seconds), e.g. when a token expires;
        replaces the deadline set before (a refreshed token moves it)."""
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = asyncio.get_running_loop().call_later(
            max(0.0, deadline - time.time()), self.close, code, reason
        )

    def close(self, code: int, reason: str = "") -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self.close_code is None:
            self.close_code = code
            self.close_reason = reason
            self.closed.set()
            if self.sink is not None:
                self.sink.close()
            if self._wakeup is not None and self._drained is not None:
                self._wakeup.set()
                self._drained.set()

    async def batches(self) -> AsyncIterator[list[Any]]:
        """Yield everything queued, as it comes, until the subscriber is closed."""
        if self._wakeup is None or self._drained is None:
            return  # direct output: nothing is ever queued
        while self.close_code is None:
            await self._wakeup.wait()
            self._wakeup.clear()
            if self.close_code is not None:
                return
            items, self._queue = self._queue, []
            self._bytes = 0
            self._drained.set()
            yield items

    async def wait_for_room(self) -> None:
        """Wait until the queue is at most half full (flow control for replays)."""
        if self.sink is not None:
            await self.sink.drained()
            return
        assert self._drained is not None
        while self.close_code is None and (
            len(self._queue) * 2 >= self.max_messages or self._bytes * 2 >= self.max_bytes
        ):
            self._drained.clear()
            await self._drained.wait()


class Conflated:
    """The subscribers of a room on this instance that asked for one interval, the
    newest update per key waiting for it (chat_gateway.core.conflation), and the one
    timer that flushes it. Each item is ``(seq or None, frame per transport)``."""

    __slots__ = ("ms", "interval", "subs", "buffer", "timer")

    def __init__(self, ms: int) -> None:
        self.ms = ms
        self.interval = ms / 1000
        self.subs: dict[Subscriber, None] = {}
        self.buffer: ConflationBuffer[tuple[int | None, OncePerTransport]] = ConflationBuffer()
        self.timer: asyncio.TimerHandle | None = None


class Room:
    """A room held on this instance: its subscribers, and its sequencer
    (chat_gateway.core.sequencer) with the timers and fill tasks it asked for. A
    state room also holds its values (``state``) and the newest seq of a write
    this instance knows committed (``newest``: delivered, waiting in a gap, or
    heard of from SQL); a state or ephemeral room its subscribers without
    conflation (``direct``) and its conflation groups by interval in ms
    (``groups``; ``grouped``: each grouped subscriber's)."""

    __slots__ = (
        "hub",
        "name",
        "channel",
        "name_json",
        "subs",
        "sequencer",
        "timers",
        "fill_task",
        "changes_task",
        "kind",
        "state",
        "newest",
        "direct",
        "groups",
        "grouped",
    )

    def __init__(self, hub: Hub, name: str, channel: str) -> None:
        self.hub = hub
        self.name = name
        self.channel = channel
        # A copy: orjson's own bytes keep a 4 KiB buffer each, for the room's lifetime.
        self.name_json = bytes(memoryview(orjson.dumps(name)))
        self.subs: dict[Subscriber, None] = {}
        self.sequencer: Sequencer  # set by Hub._open_room, which knows the callbacks
        self.timers: dict[Timer, asyncio.TimerHandle] = {}
        self.fill_task: asyncio.Task[None] | None = None
        self.changes_task: asyncio.Task[None] | None = None
        self.kind = RoomKind.STORED
        self.state: LiveState | None = None  # a state room's values, once opened
        self.newest = 0  # (state rooms only)
        self.direct: dict[Subscriber, None] = {}  # (state and ephemeral rooms only)
        self.groups: dict[int, Conflated] = {}
        self.grouped: dict[Subscriber, Conflated] = {}

    # -- the sequencer's shell (chat_gateway.core.sequencer.Shell) ---------------------

    def deliver(self, seq: int, created_ms: int, changes: int | None, body: bytes) -> None:
        self.hub._dispatch(self, seq, created_ms, changes, body)

    def deliver_change(self, change: int, after_seq: int, body: bytes) -> None:
        self.hub._dispatch_change(self, change, after_seq, body)

    def skip_changes(self, previous: int, to: int) -> None:
        """Numbers up to ``to`` will never be read: the subscribers in step with the
        room move past them too."""
        name = self.name
        for sub in self.subs:
            if sub.ccursors is not None and sub.ccursors.get(name) == previous:
                sub.ccursors[name] = to

    def schedule(self, timer: Timer, delay: float | None) -> None:
        handle = self.timers.pop(timer, None)
        if handle is not None:
            handle.cancel()
        if delay is not None:
            self.timers[timer] = asyncio.get_running_loop().call_later(
                delay, self.hub._timer_fired, self, timer
            )

    def fill(self) -> None:
        self.hub._start_fill(self)

    def fill_changes(self) -> None:
        self.hub._start_changes_fill(self)


def _subscribed(sub: Subscriber, room: str, seq: int, change: int, kind: str) -> None:
    """Answer a WebSocket's subscribe (an SSE stream has no such frame): the room's seq
    and last change number now, and its kind (stored, ephemeral or state)."""
    if sub.transport == WS:
        sub.reply({"type": "subscribed", "room": room, "seq": seq, "change": change, "kind": kind})


class RoomStats(NamedTuple):
    """What the hub tells of a held room (``Hub.room_stats``)."""

    seq: int  # the last message delivered in order
    change: int  # the last change delivered
    subscribers: int
    waiting: int  # live messages and changes held for their turn
    gap_timer: bool  # a gap's timer is armed


class Hub:
    def __init__(
        self,
        broker: Broker,
        history: HistoryCache,
        *,
        prefix: str = "chat:",
        gap_wait: float = 0.25,
        position_interval: float = 3.0,
        metrics: Metrics | None = None,
        namespaces: Namespaces | None = None,
        tombstone_ttl: float = 86400.0,
        origin: str | None = None,
    ) -> None:
        self.broker = broker
        # This instance, in the events it publishes (``from``): it gives them to its
        # own subscribers at once (:meth:`local`) and skips them when the broker
        # brings them back.
        self.origin = origin if origin is not None else secrets.token_hex(8)
        # Room kinds and their default conflation (NAMESPACES_FILE).
        self.namespaces = namespaces if namespaces is not None else Namespaces()
        self.tombstone_ttl = tombstone_ttl  # seconds a held state room keeps a tombstone
        self.history = history
        self.store = history.store
        self.prefix = prefix
        self.gap_wait = gap_wait
        self.position_interval = position_interval
        # Without the instance's own (a hub on its own, in tests): figures nobody reads.
        self.metrics = metrics if metrics is not None else Metrics()
        self.rooms: dict[str, Room] = {}
        self.subscribers: dict[int, Subscriber] = {}
        self._by_channel: dict[str, Room] = {}
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._position_task: asyncio.Task[None] | None = None
        self._checks = 0
        self._next_id = 1  # the id register gives the next subscriber
        self._clock: Callable[[], float] = time.monotonic  # the loop's, once started
        # GETs of a state room's values this instance holds no current values of.
        self.state_reads = StateReads(
            self.store,
            history,
            self.metrics,
            self._spawn,
            max_age=position_interval * STORE_CHECK_EVERY,
        )

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        self._clock = asyncio.get_running_loop().time  # one for every room's sequencer
        self.broker.on_message(self._on_broker_message)
        self.broker.on_reconnect(self._on_reconnect)
        self._position_task = every(self.position_interval, self.check_positions, "position check")

    async def close(self, code: int = CLOSE_GOING_AWAY, reason: str = "server shutdown") -> None:
        self.close_subscribers(code, reason)
        tasks = [t for t in (self._position_task, *self._tasks) if t is not None]
        for room in self.rooms.values():
            tasks.extend(t for t in (room.fill_task, room.changes_task) if t is not None)
            room.sequencer.close()
            self._drop_groups(room)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def channel(self, room: str) -> str:
        return f"{self.prefix}room:{{{room}}}"

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- what the hub tells ------------------------------------------------

    def room_stats(self) -> dict[str, RoomStats]:
        """Every held room whose position is known (one still joining is left out)."""
        stats: dict[str, RoomStats] = {}
        for name, r in self.rooms.items():
            s = r.sequencer
            if s.seq is not None:
                stats[name] = RoomStats(
                    s.seq, s.change, len(r.subs), s.waiting, s.due(Timer.GAP) is not None
                )
        return stats

    def positions(self) -> dict[str, tuple[int, int]]:
        """Every held room whose position is known: its seq and its subscribers here.
        The light form of :meth:`room_stats`, for what reads every room every second."""
        return {
            name: (seq, len(r.subs))
            for name, r in self.rooms.items()
            if (seq := r.sequencer.seq) is not None
        }

    def held_rooms(self) -> list[str]:
        """The rooms this instance holds subscribers in (or is joining)."""
        return list(self.rooms)

    def connections(self) -> int:
        """This instance's registered connections."""
        return len(self.subscribers)

    def of_user(self, user: str, room: str | None = None) -> list[Subscriber]:
        """This instance's connections of ``user`` (with ``room``: those subscribed to it)."""
        return [
            sub
            for sub in self.subscribers.values()
            if sub.user == user and (room is None or sub.holds(room))
        ]

    def close_subscribers(self, code: int, reason: str) -> None:
        """Close every connection (their sessions end and unregister)."""
        for sub in list(self.subscribers.values()):
            sub.close(code, reason)

    # -- connections -------------------------------------------------------

    def register(self, sub: Subscriber) -> None:
        sub.id = self._next_id
        self._next_id += 1
        self.subscribers[sub.id] = sub
        sub.on_slow = self._slow

    def _slow(self, sub: Subscriber) -> None:
        log.info("subscriber %d (%s) closed as slow", sub.id, sub.transport)
        self.metrics.slow_disconnects.labels(sub.transport).inc()

    async def unregister(self, sub: Subscriber) -> None:
        self.subscribers.pop(sub.id, None)
        for room in list(sub.cursors):
            await self.unsubscribe(sub, room)

    @contextlib.asynccontextmanager
    async def _room_lock(self, room: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(room, (asyncio.Lock(), 0))
        self._locks[room] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[room]
            if users == 1:
                del self._locks[room]
            else:
                self._locks[room] = (lock, users - 1)

    async def subscribe(
        self,
        sub: Subscriber,
        room: str,
        since: int | None = None,
        changes_since: int | None = None,
        conflate_ms: int | None = None,
    ) -> int:
        """Join ``room``; queue the ``subscribed`` frame, then (with ``since``) every
        message after it, then live ones. With ``changes_since`` also every edit and
        delete numbered after it (to messages held or replayed), then live ones;
        without it, live changes only. Returns the room's latest seq.

        A state room: ``subscribed``, then a ``snapshot`` (without ``since``, or
        from below the purged horizon) or the newest write of every key written
        after ``since``, then live ``state`` frames. ``conflate_ms`` (state and
        ephemeral rooms; None: the namespace's): at most one frame per key per
        interval, the newest."""
        if room in sub.cursors:
            await self.unsubscribe(sub, room)
        r = self.rooms.get(room)
        if r is None or r.sequencer.seq is None:
            async with self._room_lock(room):
                r = self.rooms.get(room)
                if r is None:
                    r = await self._open_room(room)
                elif r.state is not None:
                    self.metrics.state_snapshots.labels("memory").inc()
        elif r.state is not None:
            self.metrics.state_snapshots.labels("memory").inc()
        latest = r.sequencer.seq
        assert latest is not None
        if r.kind is not RoomKind.STORED:
            if conflate_ms is None:
                conflate_ms = self.namespaces.of(room).conflate_ms
            if r.state is not None:
                self._subscribe_state(sub, r, latest, since)
            else:
                sub.cursors[room] = latest
                r.subs[sub] = None
                _subscribed(sub, room, latest, 0, "ephemeral")
            self._join(r, sub, conflate_ms)
            self.metrics.subscriptions.inc()
            return latest
        cursor = latest if since is None else since
        sub.cursors[room] = cursor
        last_change = r.sequencer.change
        if sub.ccursors is None:
            sub.ccursors = {}
        sub.ccursors[room] = (
            last_change if changes_since is None else min(changes_since, last_change)
        )
        r.subs[sub] = None
        _subscribed(sub, room, latest, last_change, "stored")
        self.metrics.subscriptions.inc()
        if latest > cursor or sub.ccursors[room] < last_change:
            self._catch_up(sub, r)
        return latest

    def _subscribe_state(self, sub: Subscriber, r: Room, latest: int, since: int | None) -> None:
        """Everything of a state subscription but joining the live stream: the
        cursor, ``subscribed``, then the snapshot or the writes after ``since``, all
        from the room's values at its position (no await: no write can come between
        them and the live frames, which go only above the cursor)."""
        state = r.state
        assert state is not None
        room = r.name
        sub.cursors[room] = latest if since is None else max(since, latest)
        r.subs[sub] = None
        _subscribed(sub, room, latest, 0, "state")
        if since is None or not state.resumable(since):
            sub.push(
                state.snapshot(
                    sub.transport,
                    latest,
                    lambda transport, values: snapshot_frame(
                        transport, r.name_json, latest, values
                    ),
                )
            )
            return
        for entry in state.since(since):
            if not sub.push(state_frame(sub.transport, r.name_json, entry.seq, entry.to_json())):
                return

    async def state_document(self, room: str) -> bytes:
        """``GET /v1/rooms/{room}/state``: ``{"room", "seq", "values"}``, never older
        than a write acknowledged before the call, by this instance or by any other
        whose seq raise reached Redis (``HistoryCache.acknowledged``, the room's seq
        key, read first). From the room's held values when their position is at
        least that and every write this instance knows committed (the subscribers'
        snapshot, encoded once per write); else from a read of the store shared
        with the other GETs of the room, or kept from the last one while no
        write came after it (chat_gateway.delivery.state_reads)."""
        floor = await self.history.acknowledged(room)
        r = self.rooms.get(room)
        if r is not None and r.state is not None:
            at = r.sequencer.seq
            if at is not None and at >= max(floor or 0, r.newest):
                self.metrics.state_snapshots.labels("memory").inc()
                name = r.name_json
                return r.state.snapshot(
                    DOCUMENT, at, lambda _, values: state_document(name, at, values)
                )
        return await self.state_reads.read(room, self.channel(room), floor)

    def _join(self, r: Room, sub: Subscriber, conflate_ms: int) -> None:
        """Into the room's live stream: directly, or the group of its interval."""
        if conflate_ms <= 0:
            r.direct[sub] = None
            return
        group = r.groups.get(conflate_ms)
        if group is None:
            group = r.groups[conflate_ms] = Conflated(conflate_ms)
        group.subs[sub] = None
        r.grouped[sub] = group

    def _leave(self, r: Room, sub: Subscriber) -> None:
        r.direct.pop(sub, None)
        group = r.grouped.pop(sub, None)
        if group is not None:
            group.subs.pop(sub, None)
            if not group.subs:
                if group.timer is not None:
                    group.timer.cancel()
                del r.groups[group.ms]

    def _drop_groups(self, r: Room) -> None:
        for group in r.groups.values():
            if group.timer is not None:
                group.timer.cancel()
                group.timer = None

    def _conflate(self, r: Room, key: str, seq: int | None, frame_for: OncePerTransport) -> None:
        """Hold an update for every conflation group of the room; the first update
        of a group's interval arms its timer."""
        for group in r.groups.values():
            if group.buffer.add(key, (seq, frame_for)) and group.timer is None:
                group.timer = asyncio.get_running_loop().call_later(
                    group.interval, self._flush, r, group
                )

    def _flush(self, r: Room, group: Conflated) -> None:
        """A group's interval is over: each key's newest frame, encoded once per
        transport, to every subscriber of the group (one whose cursor is at or past
        a frame's seq, from its snapshot, drops it)."""
        group.timer = None
        room = r.name
        for seq, frame_for in group.buffer.take():
            for sub in group.subs:
                if seq is None:
                    sub.push(frame_for(sub.transport))
                    continue
                cursor = sub.cursors.get(room)
                if cursor is None or seq <= cursor:
                    continue
                if sub.push(frame_for(sub.transport)):
                    sub.cursors[room] = seq

    async def _open_room(self, room: str) -> Room:
        r = Room(self, room, self.channel(room))
        r.kind = self.namespaces.of(room).kind
        r.sequencer = Sequencer(
            r,
            clock=self._clock,
            gap_wait=self.gap_wait,
            page_size=MAX_PAGE,
            max_pending=MAX_PENDING,
        )
        self.rooms[room] = r
        self._by_channel[r.channel] = r
        try:
            await self.broker.subscribe(r.channel)
            # Subscribed first, then read the position: anything published
            # meanwhile is held by the sequencer and goes in turn after it.
            if r.kind is RoomKind.STATE:
                # The room's values and position in one read (the snapshot every
                # subscriber here is given from memory after).
                snapshot = await self.store.state(room)
                self.metrics.state_snapshots.labels("store").inc()
                r.state = LiveState(snapshot)
                seq, change = snapshot.seq, 0
            else:
                seq, change = await self.store.position(room)
        except BaseException:
            self.rooms.pop(room, None)
            self._by_channel.pop(r.channel, None)
            r.sequencer.close()
            with contextlib.suppress(Exception):
                await self.broker.unsubscribe(r.channel)
            raise
        r.sequencer.start(seq, change)
        return r

    async def unsubscribe(self, sub: Subscriber, room: str) -> bool:
        if sub.cursors.pop(room, None) is None:
            return False
        if sub.ccursors is not None:
            sub.ccursors.pop(room, None)
        task = sub.catchups.pop(room, None)
        if task is not None:
            task.cancel()
        self.metrics.subscriptions.dec()
        r = self.rooms.get(room)
        if r is None:
            return True
        r.subs.pop(sub, None)
        if r.kind is not RoomKind.STORED:
            self._leave(r, sub)
        if not r.subs:
            async with self._room_lock(room):
                if not r.subs and self.rooms.get(room) is r:
                    del self.rooms[room]
                    del self._by_channel[r.channel]
                    r.sequencer.close()
                    self._drop_groups(r)
                    for fill in (r.fill_task, r.changes_task):
                        if fill is not None:
                            fill.cancel()
                    await self.broker.unsubscribe(r.channel)
        return True

    # -- the live stream ---------------------------------------------------

    def local(self, channel: str, data: bytes) -> None:
        """A payload this instance is publishing, given to its own subscribers now,
        not after the broker's round trip (as Socket.IO's adapters broadcast to
        their local sockets first). Messages and state writes come back from the
        broker too and are dropped there by their seq, as any repeat is; events
        come back with this instance's ``origin`` and are skipped. A state room's
        answer to ``GET`` read before it is no longer served (``StateReads.written``)."""
        self.state_reads.written(channel)
        self._received(channel, data, local=True)

    def _on_broker_message(self, channel: str, data: bytes) -> None:
        self._received(channel, data, local=False)

    def _received(self, channel: str, data: bytes, *, local: bool) -> None:
        r = self._by_channel.get(channel)
        if r is None:
            return
        payload = wire.decode(data)
        if isinstance(payload, wire.MessagePayload):
            if payload.trace is None:
                r.sequencer.live_message(
                    payload.seq, payload.created_ms, payload.changes, payload.body
                )
            else:  # tracing on: a `deliver` span in the post's trace (chat_gateway.tracing)
                with tracing.active.deliver(payload.trace, r.name, payload.seq):
                    r.sequencer.live_message(
                        payload.seq, payload.created_ms, payload.changes, payload.body
                    )
        elif isinstance(payload, wire.ChangePayload):  # an edit or delete
            self.history.forget(r.name)  # this instance's window holds the old text
            r.sequencer.live_change(payload.change, payload.after_seq, payload.body)
        elif isinstance(payload, wire.StatePayload):
            # A state room's write, sequenced like a message: while the room opens,
            # held until its values are read, then given in turn after them.
            if r.kind is RoomKind.STATE:
                if payload.seq > r.newest:
                    r.newest = payload.seq
                r.sequencer.live_message(payload.seq, payload.updated_ms, None, payload.body)
        elif isinstance(payload, wire.EventPayload):
            if not local and payload.origin == self.origin:
                return  # given to this instance's subscribers when it was published
            if r.groups:  # conflated per event name for the subscribers that asked
                self._dispatch_event(r, payload, event_frame, only=r.direct)
                frame_for = OncePerTransport(lambda transport: event_frame(transport, payload))
                self._conflate(r, payload.event, None, frame_for)
            else:
                self._dispatch_event(r, payload, event_frame)
        elif isinstance(
            payload, wire.PresencePayload
        ):  # join/leave (chat_gateway.delivery.presence)
            self._dispatch_event(r, payload, presence_frame)
        elif isinstance(payload, wire.TypingPayload):  # not to the typist's own connections
            self._dispatch_event(r, payload, chat_frame, skip_user=payload.user)
        elif isinstance(payload, wire.ReadPayload):
            self._dispatch_event(r, payload, chat_frame)

    def _timer_fired(self, r: Room, timer: Timer) -> None:
        r.timers.pop(timer, None)
        if r.sequencer.timer_fired(timer):
            self.metrics.gap_fills.labels(timer.value).inc()

    def fill(self, room: str) -> None:
        """Read the store after the room's position and dispatch what is there."""
        r = self.rooms.get(room)
        if r is not None and r.sequencer.seq is not None:
            r.sequencer.fill()

    def committed_elsewhere(self, room: str, seq: int) -> None:
        """A message committed without this gateway's publish (a backend's SQL
        ``chat_post``): the cache's seq key is raised to it, so no instance serves a
        page without it, and the room, if held here and behind, fills from the store
        (a state room's ``GET`` answers from the store until then)."""
        self._spawn(self.history.raise_behind({room: seq}), f"raise-{room}")
        self.state_reads.written(self.channel(room))
        r = self.rooms.get(room)
        if r is not None and seq > r.newest:
            r.newest = seq
        if r is not None and r.sequencer.seq is not None and r.sequencer.seq < seq:
            self.metrics.gap_fills.labels("notified").inc()
            r.sequencer.fill()

    def _start_fill(self, r: Room) -> None:
        r.fill_task = self._spawn(self._fill(r), f"fill-{r.name}")

    async def _fill(self, r: Room) -> None:
        """Messages after the room's position from the store, then the change log
        after the room's last change (so no change committed before a message read
        is missed), handed to the sequencer page by page until it has enough."""
        s = r.sequencer
        try:
            if r.state is not None:
                # The current keys written after the position: one read, which may
                # skip seqs whose keys were written again (Sequencer.state_page).
                snapshot = await self.store.state(r.name, after=s.fill_next())
                if s.open:
                    s.state_page(snapshot.entries, snapshot.seq)
                return
            while s.open:
                page = await self.store.history(r.name, after=s.fill_next(), limit=MAX_PAGE)
                known = s.change
                changes = []
                if page.messages:
                    self.metrics.change_log_reads.labels("fill").inc()
                    changes = await self.store.changes(r.name, after=known, limit=MAX_PAGE)
                if not s.open or not s.fill_page(page.messages, page.has_more, changes, known):
                    break
        except StoreUnavailable as exc:
            log.warning("gap fill for room %s failed: %s", r.name, exc)
        finally:
            r.fill_task = None
            s.fill_done()

    def _dispatch(
        self, r: Room, seq: int, created_ms: int, changes: int | None, body: bytes
    ) -> None:
        if r.state is not None:
            self._dispatch_state(r, seq, created_ms, body)
            return
        frame_for = OncePerTransport(
            lambda transport: message_frame(transport, r.name_json, seq, body)
        )
        delivered = 0
        for sub in r.subs:
            cursor = sub.cursors.get(r.name)
            if cursor is None or seq <= cursor:
                continue
            if seq != cursor + 1 or (
                changes is not None
                and sub.ccursors is not None
                and sub.ccursors.get(r.name, changes) < changes
            ):
                # Behind on the messages, or on the changes committed before this one.
                self._catch_up(sub, r)
                continue
            if sub.push(frame_for(sub.transport)):
                sub.cursors[r.name] = seq
                delivered += 1
            else:
                self.metrics.messages_dropped.labels("slow_consumer").inc()
        if delivered:
            self.metrics.delivered(delivered, created_ms)

    def _dispatch_state(self, r: Room, seq: int, updated_ms: int, body: bytes) -> None:
        """A state room's write, in seq order: into the room's values, to every
        subscriber without conflation above whose cursor it is, and into each
        conflation group's buffer. Encoded once per transport."""
        assert r.state is not None
        entry = StateEntry.from_json(r.name, seq, updated_ms, body)
        r.state.apply(entry)
        frame_for = OncePerTransport(
            lambda transport: state_frame(transport, r.name_json, seq, body)
        )
        room = r.name
        delivered = 0
        for sub in r.direct:
            cursor = sub.cursors.get(room)
            if cursor is None or seq <= cursor:
                continue
            if sub.push(frame_for(sub.transport)):
                sub.cursors[room] = seq
                delivered += 1
        if delivered:
            self.metrics.delivered(delivered, updated_ms)
        if r.groups:
            self._conflate(r, entry.key, seq, frame_for)

    # -- edits and deletes ------------------------------------------------------------

    def fill_changes(self, room: str, latest: int | None = None) -> bool:
        """Read the change log after the room's last change and dispatch it in turn.
        With ``latest`` (the room's last committed change, as Redis tells it): only
        when the room is behind it and no change fill runs. True when a fill starts."""
        r = self.rooms.get(room)
        if r is None:
            return False
        s = r.sequencer
        if s.seq is None or (latest is not None and (latest <= s.change or s.filling_changes)):
            return False
        s.fill_changes()
        return True

    def _start_changes_fill(self, r: Room) -> None:
        r.changes_task = self._spawn(self._fill_changes(r), f"changes-{r.name}")

    async def _fill_changes(self, r: Room) -> None:
        s = r.sequencer
        try:
            while s.open:
                self.metrics.change_log_reads.labels("change_fill").inc()
                changes = await self.store.changes(r.name, after=s.changes_next(), limit=MAX_PAGE)
                if not s.changes_page(changes):
                    break
        except StoreUnavailable as exc:
            log.warning("change fill for room %s failed: %s", r.name, exc)
        finally:
            r.changes_task = None
            s.changes_fill_done()

    def _dispatch_change(self, r: Room, change: int, after_seq: int, body: bytes) -> None:
        previous = change - 1
        frame_for = OncePerTransport(
            lambda transport: change_frame(transport, r.name_json, change, body)
        )
        for sub in r.subs:
            ccursors = sub.ccursors
            ccursor = None if ccursors is None else ccursors.get(r.name)
            cursor = sub.cursors.get(r.name)
            if ccursor is None or cursor is None or change <= ccursor:
                continue
            if ccursor != previous or cursor < after_seq:
                self._catch_up(sub, r)  # behind on changes or on the messages before it
                continue
            if sub.push(frame_for(sub.transport)):
                assert ccursors is not None
                ccursors[r.name] = change

    def _dispatch_event(
        self,
        r: Room,
        event: T,
        build: Callable[[str, T], bytes],
        *,
        skip_user: str | None = None,
        only: dict[Subscriber, None] | None = None,
    ) -> None:
        """Queue an unsequenced frame to every subscriber of the room (``only``: of
        those; but those of ``skip_user``), encoded once per transport."""
        frame_for = OncePerTransport(lambda transport: build(transport, event))
        for sub in r.subs if only is None else only:
            if skip_user is None or sub.user != skip_user:
                sub.push(frame_for(sub.transport))

    # -- per-subscriber catch-up ---------------------------------------------

    def _catch_up(self, sub: Subscriber, r: Room) -> None:
        if r.name not in sub.catchups:
            sub.catchups[r.name] = self._spawn(
                self._run_catch_up(sub, r), f"catchup-{sub.id}-{r.name}"
            )

    async def _run_catch_up(self, sub: Subscriber, r: Room) -> None:
        """Bring one subscriber up to its room from the store: messages after its
        cursor and, when it follows changes, changes after its change cursor,
        interleaved by position (``merge``: a change goes right after message
        ``after_seq``)."""
        room = r.name
        s = r.sequencer
        try:
            while sub.close_code is None and room in sub.cursors:
                cursor = sub.cursors[room]
                ccursors = sub.ccursors
                ccursor = None if ccursors is None else ccursors.get(room)
                behind = s.seq is not None and cursor < s.seq
                behind_changes = ccursor is not None and ccursor < s.change
                if not behind and not behind_changes:
                    break
                page = await self.store.history(room, after=cursor, limit=MAX_PAGE)
                # Read after the messages, so every change committed before one of
                # them is there to go before it (the page may reach past the room's
                # position, to messages the room holds back for a change).
                changes = []
                if ccursor is not None and (behind_changes or page.messages):
                    self.metrics.change_log_reads.labels("catch_up").inc()
                    changes = await self.store.changes(room, after=ccursor, limit=MAX_PAGE)
                if page.messages and sub.cursors.get(room) == cursor < page.messages[0].seq - 1:
                    # Seqs commit in order, so a hole below the first stored one is
                    # retention's work: those messages are gone; go on after them.
                    sub.cursors[room] = page.messages[0].seq - 1
                merged = merge(page.messages, changes, page_size=MAX_PAGE)
                progressed = False
                for preceding, msg in merged.steps:
                    for change in preceding:
                        if not await self._catch_up_change(sub, r, change):
                            return
                        progressed = True
                    await sub.wait_for_room()
                    if sub.cursors.get(room) != msg.seq - 1:
                        continue  # delivered live meanwhile, or unsubscribed
                    frame = message_frame(sub.transport, r.name_json, msg.seq, msg.to_json())
                    if not sub.push(frame):
                        return
                    sub.cursors[room] = msg.seq
                    progressed = True
                for change in merged.rest:
                    if change.after_seq > sub.cursors.get(room, -1):
                        break  # after messages not read yet: the next round
                    if not await self._catch_up_change(sub, r, change):
                        return
                    progressed = True
                if not progressed:
                    break
        except StoreUnavailable as exc:
            log.warning("catch-up for room %s failed: %s; closing the subscriber", room, exc)
            sub.close(CLOSE_TRY_AGAIN_LATER, "history unavailable: resume later")
        finally:
            if sub.catchups.get(room) is asyncio.current_task():
                del sub.catchups[room]

    async def _catch_up_change(self, sub: Subscriber, r: Room, change: Change) -> bool:
        """Give one change read from the store, unless the subscriber has it already.
        False when the subscriber is gone."""
        await sub.wait_for_room()
        ccursors = sub.ccursors
        if ccursors is None or r.name not in ccursors:
            return False
        if change.change <= ccursors[r.name]:
            return True  # delivered live meanwhile
        frame = change_frame(sub.transport, r.name_json, change.change, change.body())
        if not sub.push(frame):
            return False
        ccursors[r.name] = change.change
        return True

    # -- repair after loss -----------------------------------------------------

    def _on_reconnect(self) -> None:
        self.metrics.broker_reconnects.inc()
        for r in list(self.rooms.values()):
            if r.sequencer.seq is not None:
                r.sequencer.fill()
                if r.state is None:
                    r.sequencer.fill_changes()

    async def check_positions(self) -> None:
        """Fill every room whose latest committed seq is ahead of what was delivered.

        Positions come from Redis' seq keys (one pipelined read), which an instance
        cut from Redis after its commit never raised; so every ``STORE_CHECK_EVERY``
        rounds they come from the store, the truth, in one query for all rooms."""
        rooms = [r for r in self.rooms.values() if r.sequencer.seq is not None]
        if not rooms:
            return
        cutoff_ms = int((time.time() - self.tombstone_ttl) * 1000)
        for r in rooms:
            if r.state is not None:
                r.state.prune(cutoff_ms)
        names = [r.name for r in rooms]
        self._checks += 1
        if self._checks % STORE_CHECK_EVERY == 0:
            latest = await self.store.latest_seqs(names)
            # The same commits left the cache's seq keys behind: raised here, so no
            # instance goes on serving a cached page without them.
            await self.history.raise_behind(latest)
        else:
            latest = await self.history.latest_seqs(names)
        for r in rooms:
            s = r.sequencer
            if s.seq is not None and latest.get(r.name, 0) > s.seq and not s.filling:
                self.metrics.gap_fills.labels("position").inc()
                s.fill()

    # -- the server API (chat_gateway.delivery.commands) ------------------------------------

    def notify(self, room: str, build: Callable[[str, T], bytes], event: T) -> None:
        """Queue one unsequenced frame, ``build(transport, event)``, to every local
        subscriber of ``room``."""
        r = self.rooms.get(room)
        if r is not None:
            self._dispatch_event(r, event, build)
