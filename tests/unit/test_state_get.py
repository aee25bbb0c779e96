"""``Hub.state_document`` in process (the in-memory broker, a SQLite store, no
Redis): the answer of ``GET /v1/rooms/{room}/state`` from the room's held values
only when they hold every write the instance knows committed, and otherwise one
store read shared by the GETs waiting, kept until a write here."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest

from chat_gateway.core import wire
from chat_gateway.core.frames import SSE
from chat_gateway.core.namespaces import Namespace, Namespaces, RoomKind
from chat_gateway.delivery.hub import Hub, Subscriber
from chat_gateway.pubsub.memory import MemoryBroker
from chat_gateway.storage import HistoryCache
from chat_gateway.storage.records import StateSnapshot
from chat_gateway.storage.sqlite import SQLiteStore
from tests.harness import t

ROOM = "board:b"


class GatedStore(SQLiteStore):
    """The SQLite store, whose reads of a room's state hold their answer until
    ``gate`` opens (when one is set): a read that began before a write and ends
    after it, as reads on a pool of connections can. ``reading``: reads begun."""

    gate: asyncio.Event | None = None
    reading = 0

    async def state(self, room: str, *, after: int = 0) -> StateSnapshot:
        self.reading += 1
        snapshot = await super().state(room, after=after)
        if self.gate is not None:
            await self.gate.wait()
        return snapshot


@dataclass
class Parts:
    hub: Hub
    store: GatedStore

    async def write(self, key: str, value: Any, *, given: bool = True) -> int:
        """Commit one write, as the publisher does; ``given``: handed to the hub
        (``Hub.local``) as the publisher does before it acknowledges the write."""
        raw = None if value is None else orjson.dumps(value)
        (entry,) = await self.store.write_state(ROOM, [(key, raw)])
        if given:
            self.give(entry)
        return entry.seq

    def give(self, entry: Any) -> None:
        self.hub.local(self.hub.channel(ROOM), wire.encode_state(entry))

    async def get(self) -> dict[str, Any]:
        answer: dict[str, Any] = orjson.loads(await self.hub.state_document(ROOM))
        return answer

    def reads(self, source: str) -> float:
        value = self.hub.metrics.registry.get_sample_value(
            "chat_state_snapshots_total", {"source": source}
        )
        return value or 0.0


@pytest.fixture
async def parts(tmp_path: Path) -> AsyncIterator[Parts]:
    store = GatedStore(f"sqlite:///{tmp_path}/state.db")
    await store.start()
    await store.migrate()
    broker = MemoryBroker()
    await broker.start()
    namespaces = Namespaces(None, {"board": Namespace("board", RoomKind.STATE)})
    # A gap waits long: what a test leaves out of order stays out of order.
    hub = Hub(
        broker, HistoryCache(store), gap_wait=60, position_interval=3600, namespaces=namespaces
    )
    await hub.start()
    try:
        yield Parts(hub, store)
    finally:
        await hub.close()
        await broker.close()
        await store.close()


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + t(timeout)
    while not check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def values(answer: dict[str, Any]) -> dict[str, Any]:
    return {k: v["value"] for k, v in answer["values"].items()}


@contextlib.asynccontextmanager
async def held(p: Parts) -> AsyncIterator[Subscriber]:
    sub = Subscriber(SSE)
    p.hub.register(sub)
    await p.hub.subscribe(sub, ROOM)
    try:
        yield sub
    finally:
        await p.hub.unregister(sub)


async def test_concurrent_gets_share_one_read_kept_until_a_write_here(parts: Parts) -> None:
    await parts.write("a", 1)
    await parts.write("b", 2)
    answers = await asyncio.gather(*(parts.get() for _ in range(30)))
    assert all(a == answers[0] for a in answers)
    assert answers[0]["seq"] == 2 and values(answers[0]) == {"a": 1, "b": 2}
    assert parts.reads("store") == 1 and parts.reads("memory") == 29
    await asyncio.gather(*(parts.get() for _ in range(10)))
    assert parts.reads("store") == 1, "nothing written: the kept answer"
    seq = await parts.write("a", 3)
    got = await parts.get()
    assert (got["seq"], values(got)) == (seq, {"a": 3, "b": 2})
    assert parts.reads("store") == 2
    await parts.write("b", None)
    assert values(await parts.get()) == {"a": 3}


async def test_a_get_after_a_write_never_shares_a_read_that_began_before_it(
    parts: Parts,
) -> None:
    """A read of the store that began before a write and ends after its
    acknowledgement serves the GETs that were waiting for it, no GET that began
    after the acknowledgement, and is not kept."""
    await parts.write("n", 0)
    parts.store.gate = asyncio.Event()
    before = asyncio.create_task(parts.get())
    await until(lambda: parts.store.reading == 1)  # its read has the store's values
    seq = await parts.write("n", 1)  # acknowledged from here on
    after = asyncio.create_task(parts.get())
    await until(lambda: parts.store.reading == 2)
    parts.store.gate.set()
    assert values(await before) == {"n": 0}, "it began before the write"
    got = await after
    assert (got["seq"], values(got)) == (seq, {"n": 1})
    got = await parts.get()
    assert (got["seq"], values(got)) == (seq, {"n": 1})
    assert parts.reads("store") == 2


async def test_held_values_answer_unless_a_known_write_waits_in_a_gap(parts: Parts) -> None:
    await parts.write("a", 1)
    async with held(parts):
        assert parts.reads("store") == 1  # the room's opening
        answers = await asyncio.gather(*(parts.get() for _ in range(20)))
        assert all(values(a) == {"a": 1} and a["seq"] == 1 for a in answers)
        assert parts.reads("store") == 1, "from the held values"

        # Two writes committed; the later one reaches the hub first: a gap. It was
        # acknowledged, so the held values (at seq 1) are not the answer.
        (first,) = await parts.store.write_state(ROOM, [("a", b"2")])
        second = await parts.write("b", 9)
        got = await parts.get()
        assert (got["seq"], values(got)) == (second, {"a": 2, "b": 9})
        assert parts.reads("store") == 2

        parts.give(first)  # the gap closes: both delivered
        got = await parts.get()
        assert (got["seq"], values(got)) == (second, {"a": 2, "b": 9})
        assert parts.reads("store") == 2, "from the held values again"


async def test_the_held_answer_is_the_stores_byte_for_byte(parts: Parts) -> None:
    await parts.write("x", {"deep": [1, "two", None]})
    await parts.write("y", "text")
    await parts.write("x", None)
    await parts.write("z", 3.5)
    read = await parts.hub.state_document(ROOM)  # the store's, kept
    async with held(parts):
        assert parts.reads("store") == 2
        from_memory = await parts.hub.state_document(ROOM)
        assert parts.reads("store") == 2
    assert from_memory == read
    assert orjson.loads(read)["seq"] == 4 and set(orjson.loads(read)["values"]) == {"y", "z"}


async def test_a_kept_answer_is_read_again_past_its_age(parts: Parts) -> None:
    """A write recorded nowhere (its instance could not raise the seq key, then
    died) is missing from a kept answer no longer than its age bound."""
    await parts.write("a", 1)
    parts.hub.state_reads.max_age = 0.2
    await parts.get()
    await parts.write("a", 2, given=False)  # committed; this instance never told
    assert values(await parts.get()) == {"a": 1}, "kept: nothing says otherwise"
    assert parts.reads("store") == 1
    await asyncio.sleep(0.3)
    assert values(await parts.get()) == {"a": 2}
    assert parts.reads("store") == 2


async def test_a_write_made_while_the_room_opens_is_held_once_it_has(parts: Parts) -> None:
    """The room's opening subscribes to its channel, then reads the store: a write
    committed after that read and given to the hub before the read's answer is
    used goes in turn after it, into the held values and the subscriber's
    snapshot, and a GET answers it from them."""
    await parts.write("a", 1)
    parts.store.gate = asyncio.Event()
    sub = Subscriber(SSE)
    parts.hub.register(sub)
    joining = asyncio.create_task(parts.hub.subscribe(sub, ROOM))
    await until(lambda: parts.store.reading == 1)  # its read has the store's values
    seq = await parts.write("a", 2)
    parts.store.gate.set()
    assert await joining == seq
    batch = await asyncio.wait_for(anext(sub.batches()), t(5))
    head, data = batch[0].split(b"\ndata: ")
    assert head == b"id: %d\nevent: snapshot" % seq
    assert values(orjson.loads(data)) == {"a": 2}
    parts.store.gate = None
    answer = await parts.get()
    assert (answer["seq"], values(answer)) == (seq, {"a": 2})
    assert parts.reads("store") == 1, "the room's opening only"
    await parts.hub.unregister(sub)
