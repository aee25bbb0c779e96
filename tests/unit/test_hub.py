"""The hub in process: the in-memory broker, a SQLite store, no server.

Live payloads are published as an instance publishes them (chat_gateway.core.wire); what a
subscriber receives is read back as a client reads it: WebSocket frames with
websockets' own parser, SSE with the event-stream rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import pytest
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from chat_gateway.core import wire
from chat_gateway.core.frames import SSE, WS
from chat_gateway.delivery.hub import MAX_PENDING, Hub, Subscriber
from chat_gateway.delivery.output import EXTENSION, FrameSink, Output
from chat_gateway.errors import CLOSE_GOING_AWAY, CLOSE_TRY_AGAIN_LATER
from chat_gateway.pubsub.memory import MemoryBroker
from chat_gateway.storage import HistoryCache, Message
from chat_gateway.storage.sqlite import SQLiteStore
from tests.harness import t

ROOM = "lobby"
T = TypeVar("T")


@dataclass
class Parts:
    hub: Hub
    store: SQLiteStore
    broker: MemoryBroker


@contextlib.asynccontextmanager
async def _parts(tmp_path: Path, gap_wait: float) -> AsyncIterator[Parts]:
    store = SQLiteStore(f"sqlite:///{tmp_path}/hub.db")
    await store.start()
    await store.migrate()
    broker = MemoryBroker()
    await broker.start()
    hub = Hub(broker, HistoryCache(store), gap_wait=gap_wait, position_interval=3600)
    await hub.start()
    try:
        yield Parts(hub, store, broker)
    finally:
        await hub.close()
        await broker.close()
        await store.close()


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    async with _parts(tmp_path, gap_wait=0.05) as p:
        yield p


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + t(timeout)
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


async def post(p: Parts, count: int, *, publish: Callable[[int], bool] = lambda seq: True) -> None:
    """Commit ``count`` messages to the store; publish those ``publish`` lets through."""
    for i in range(count):
        msg, _ = await p.store.append(ROOM, "ann", f"text {i}")
        if publish(msg.seq):
            await p.broker.publish(p.hub.channel(ROOM), wire.encode_message(msg))


# -- clients -----------------------------------------------------------------------


def _run(gen: Generator[None, None, T]) -> T:
    """Run a websockets generator-based coroutine over data already fed."""
    try:
        next(gen)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    raise AssertionError("the bytes end inside a frame")


@dataclass
class WSClient:
    """A WebSocket subscriber with direct output (chat_gateway.delivery.output), and the bytes its
    socket got, read as a client reads them."""

    sub: Subscriber
    wire_bytes: bytearray = field(default_factory=bytearray)

    @classmethod
    def make(cls, *, reading: bool = True, **kwargs: Any) -> WSClient:
        """``reading=False``: a peer that takes nothing, so the socket's buffer grows."""
        client: WSClient

        def write(data: bytes) -> int:
            client.wire_bytes += data
            return 0 if reading else len(client.wire_bytes)

        async def drained() -> None:
            return None

        scope = {"extensions": {EXTENSION: {"write": write, "drained": drained}}}
        sink = FrameSink.of(scope, Output())
        assert sink is not None
        client = cls(Subscriber(WS, sink=sink, **kwargs))
        return client

    def frames(self) -> list[dict[str, Any]]:
        reader = StreamReader()
        reader.feed_data(bytes(self.wire_bytes))
        reader.feed_eof()
        out = []
        while not _run(reader.at_eof()):
            frame = _run(Frame.parse(reader.read_exact, mask=False))
            assert frame.opcode is Opcode.TEXT and frame.fin
            out.append(orjson.loads(frame.data))
        return out

    def seqs(self) -> list[int]:
        return [f["message"]["seq"] for f in self.frames() if f["type"] == "message"]


@dataclass
class SSEClient:
    """An SSE subscriber (queue and writer), its stream read by the event-stream rules."""

    sub: Subscriber
    stream: bytearray = field(default_factory=bytearray)
    task: asyncio.Task[None] | None = None

    @classmethod
    def make(cls, **kwargs: Any) -> SSEClient:
        client = cls(Subscriber(SSE, **kwargs))
        client.task = asyncio.create_task(client._read())
        return client

    async def _read(self) -> None:
        async for batch in self.sub.batches():
            self.stream += b"".join(batch)

    def events(self) -> list[dict[str, str]]:
        """Complete events: fields ``id``, ``event``, ``data`` (data lines joined by LF)."""
        text = bytes(self.stream).decode().replace("\r\n", "\n").replace("\r", "\n")
        out = []
        event: dict[str, str] = {}
        for line in text.split("\n")[:-1]:  # the last piece is an unfinished line
            if line == "":
                if "data" in event:
                    out.append(event)
                event = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                event[name] = event[name] + "\n" + value if name in event else value
        return out

    def seqs(self) -> list[int]:
        msgs = [e for e in self.events() if e.get("event") == "message"]
        for e in msgs:
            assert int(e["id"]) == orjson.loads(e["data"])["seq"]
        return [int(e["id"]) for e in msgs]


async def joined(p: Parts, since: int | None = None, **kwargs: Any) -> tuple[WSClient, SSEClient]:
    ws, sse = WSClient.make(**kwargs), SSEClient.make(**kwargs)
    for sub in (ws.sub, sse.sub):
        p.hub.register(sub)
        await p.hub.subscribe(sub, ROOM, since)
    return ws, sse


# -- delivery --------------------------------------------------------------------


async def test_live_messages_in_order_on_both_transports(parts: Parts) -> None:
    ws, sse = await joined(parts)
    await post(parts, 5)
    await until(lambda: ws.seqs() == sse.seqs() == [1, 2, 3, 4, 5])
    frames = ws.frames()
    assert frames[0] == {
        "type": "subscribed",
        "room": ROOM,
        "seq": 0,
        "change": 0,
        "kind": "stored",
    }
    assert frames[1]["room"] == ROOM and frames[1]["message"]["text"] == "text 0"
    assert orjson.loads(sse.events()[0]["data"])["text"] == "text 0"
    assert ws.sub.id != sse.sub.id and parts.hub.subscribers[ws.sub.id] is ws.sub


async def test_gap_filled_from_the_store(parts: Parts) -> None:
    ws, sse = await joined(parts)
    await post(parts, 4, publish=lambda seq: seq != 2)  # 2 never reaches the broker
    await until(lambda: ws.seqs() == sse.seqs() == [1, 2, 3, 4])
    assert parts.hub.room_stats()[ROOM].waiting == 0


async def test_v1_payload_without_change_count_is_delivered(parts: Parts) -> None:
    ws, sse = await joined(parts)
    msg, _ = await parts.store.append(ROOM, "ann", "old release")
    v1 = Message(msg.id, msg.room, msg.seq, msg.author, msg.text, msg.created_ms)
    await parts.broker.publish(parts.hub.channel(ROOM), wire.encode_message(v1))
    assert wire.encode_message(v1).startswith(b"m:")
    await until(lambda: ws.seqs() == sse.seqs() == [1])


async def test_catch_up_on_subscribe_with_since(parts: Parts) -> None:
    await post(parts, 5)  # nobody listens: not published
    ws, sse = await joined(parts, since=2)
    await until(lambda: ws.seqs() == sse.seqs() == [3, 4, 5])
    await post(parts, 2)
    await until(lambda: ws.seqs() == sse.seqs() == [3, 4, 5, 6, 7])


async def test_pending_overflow_is_dropped_and_read_from_the_store(tmp_path: Path) -> None:
    # A gap no timer fills within the test: only the overflow's fill can close it.
    async with _parts(tmp_path, gap_wait=60.0) as p:
        ws, sse = await joined(p, max_messages=10 * MAX_PENDING, max_bytes=1 << 30)
        total = MAX_PENDING + 2
        # Seq 1 is lost: everything after it waits in pending until the bound.
        await post(p, total, publish=lambda seq: seq != 1)
        await until(lambda: len(ws.seqs()) == total, timeout=20)
        assert ws.seqs() == sse.seqs() == list(range(1, total + 1))
        assert p.hub.room_stats()[ROOM].waiting == 0


async def test_slow_subscriber_is_closed_and_resumes_with_since(parts: Parts) -> None:
    slow_queue = Subscriber(SSE, max_messages=3)  # nobody drains it
    slow_sink = WSClient.make(reading=False, max_bytes=400)
    slow: list[Subscriber] = []
    for sub in (slow_queue, slow_sink.sub):
        parts.hub.register(sub)
        sub.on_slow = slow.append  # as Hub.register's hook, recorded
        await parts.hub.subscribe(sub, ROOM)
    ws, sse = await joined(parts)
    await post(parts, 8)
    await until(lambda: ws.seqs() == sse.seqs() == list(range(1, 9)))
    for sub in (slow_queue, slow_sink.sub):
        assert sub.close_code == CLOSE_TRY_AGAIN_LATER
        assert sub.close_reason.startswith("slow consumer")
        assert sub.closed.is_set()
    assert {sub.id for sub in slow} == {slow_queue.id, slow_sink.sub.id}
    got = slow_sink.seqs()
    assert got == list(range(1, len(got) + 1)) and len(got) < 8
    assert not slow_queue.push(b"more"), "a closed subscriber takes nothing"
    # Resuming from what it got, the client has every message once and in order.
    await parts.hub.unregister(slow_sink.sub)
    again, _ = await joined(parts, since=got[-1] if got else 0)
    await until(lambda: got + again.seqs() == list(range(1, 9)))


# -- unsequenced ---------------------------------------------------------------------


async def test_events_presence_typing_and_receipts(parts: Parts) -> None:
    ws, sse = await joined(parts, user="bob")
    typist, _ = await joined(parts, user="ann")
    channel = parts.hub.channel(ROOM)
    for payload in (
        wire.encode_event(ROOM, "ping", {"n": 1}),
        wire.encode_presence(ROOM, "join", "ann"),
        wire.encode_typing(ROOM, "ann"),
        wire.encode_read(ROOM, "ann", 4),
        b"z:a kind of a later release",
    ):
        await parts.broker.publish(channel, payload)
    await until(lambda: len(ws.frames()) == 5 and len(sse.events()) == 4)
    assert ws.frames()[1:] == [
        {"type": "event", "room": ROOM, "event": "ping", "data": {"n": 1}},
        {"type": "presence", "room": ROOM, "action": "join", "user": "ann"},
        {"type": "typing", "room": ROOM, "user": "ann"},
        {"type": "read", "room": ROOM, "user": "ann", "seq": 4},
    ]
    assert [(e["event"], orjson.loads(e["data"])) for e in sse.events()] == [
        ("ping", {"room": ROOM, "data": {"n": 1}}),
        ("presence", {"room": ROOM, "action": "join", "user": "ann"}),
        ("typing", {"type": "typing", "room": ROOM, "user": "ann"}),
        ("read", {"type": "read", "room": ROOM, "user": "ann", "seq": 4}),
    ]
    # The typist's own connection is not told it types.
    await until(lambda: len(typist.frames()) == 4)
    assert [f["type"] for f in typist.frames()] == ["subscribed", "event", "presence", "read"]


async def test_what_this_instance_publishes_reaches_its_subscribers_before_the_broker(
    parts: Parts,
) -> None:
    """Hub.local: a message, state write or event published here is given to this
    instance's subscribers at once, in the same call; the broker's copy coming back
    adds nothing (a message by its seq, an event by its origin), while an event of
    another instance is delivered as ever."""
    ws, sse = await joined(parts)
    channel = parts.hub.channel(ROOM)
    msg, _ = await parts.store.append(ROOM, "ann", "first")
    parts.hub.local(channel, wire.encode_message(msg))
    mine = wire.encode_event(ROOM, "ping", {"n": 1}, parts.hub.origin)
    parts.hub.local(channel, mine)
    await asyncio.sleep(0)  # the end of the loop turn: each socket's one write
    assert ws.seqs() == [1] and [f["type"] for f in ws.frames()] == [
        "subscribed",
        "message",
        "event",
    ]
    # the broker brings both back, then an event another instance published
    await parts.broker.publish(channel, wire.encode_message(msg))
    await parts.broker.publish(channel, mine)
    theirs = wire.encode_event(ROOM, "ping", {"n": 2}, "another-instance")
    await parts.broker.publish(channel, theirs)
    await until(lambda: len(ws.frames()) == 4 and len(sse.events()) == 3)
    await asyncio.sleep(0.05)
    assert ws.seqs() == sse.seqs() == [1]
    assert [f.get("data") for f in ws.frames() if f["type"] == "event"] == [{"n": 1}, {"n": 2}]
    assert [orjson.loads(e["data"]).get("data") for e in sse.events()[1:]] == [{"n": 1}, {"n": 2}]
    # an event without an origin (an older release published it) is delivered
    await parts.broker.publish(channel, wire.encode_event(ROOM, "ping", {"n": 3}))
    await until(lambda: len(ws.frames()) == 5)
    assert wire.decode(mine) == wire.EventPayload(ROOM, "ping", {"n": 1}, parts.hub.origin)


async def test_close_ends_every_subscriber_and_the_hubs_timers(tmp_path: Path) -> None:
    async with _parts(tmp_path, gap_wait=60.0) as p:
        ws, sse = await joined(p)
        await post(p, 3, publish=lambda seq: seq != 1)  # a gap: a timer waits for seq 1
        await until(lambda: p.hub.room_stats()[ROOM].waiting == 2)
        assert p.hub.room_stats()[ROOM].gap_timer
        await p.hub.close()
        for sub in (ws.sub, sse.sub):
            assert sub.close_code == CLOSE_GOING_AWAY and sub.close_reason == "server shutdown"
        assert not p.hub.room_stats()[ROOM].gap_timer
        assert sse.task is not None
        await asyncio.wait_for(sse.task, t(5))  # the writer's stream ends
        assert ws.seqs() == sse.seqs() == []
