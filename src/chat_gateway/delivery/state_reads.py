"""Reads of a state room's values from the store for ``GET /v1/rooms/{room}/state``,
on an instance that holds no current values of the room (``Hub.state_document``
answers from the room's held values when it can).

One store read per room at a time, shared by every ``GET`` that comes while it
runs, and its answer kept after it (``KEPT_ROOMS`` rooms and ``KEPT_BYTES`` bytes
in all, the least recently read going first) for as long as it is known to be
current, and ``max_age`` seconds at most. Both rest on the room's seq key in the cache
(``HistoryCache.acknowledged``), which every instance raises before it
acknowledges a write: a ``GET`` reads it first, so every write acknowledged before
the ``GET`` began is at or below it, and an answer read at a seq at or above it
holds them all. A shared read found older than that (it began before such a
write) is followed by the next one, which began after the key was read.

What the key does not record (without Redis, every write: there is one instance;
with Redis, a write whose raise failed, or a write from SQL whose notification
raised no key) is this instance's to know: a write it commits or hears of
(``written``, before the write is acknowledged) drops the room's kept answer and
leaves a read in flight to those already waiting for it, so no ``GET`` after the
acknowledgement is answered from before the write. A write whose raise failed on
another instance that then died before retrying it is recorded nowhere; the age
bound keeps an answer that misses it no longer than the hub's store position
check keeps the room's held values behind it.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, NamedTuple

import orjson

from chat_gateway.core.frames import state_document
from chat_gateway.metrics import Metrics
from chat_gateway.storage import HistoryCache, Store
from chat_gateway.storage.records import values_json

# Rooms whose last read answer an instance keeps, and the bytes of all of them.
KEPT_ROOMS = 256
KEPT_BYTES = 16 * 1024 * 1024


class Answer(NamedTuple):
    """A ``GET`` answer read from the store: the room's seq then, the body, and when
    the read began (the event loop's clock)."""

    seq: int
    body: bytes
    at: float


class StateReads:
    """The reads in flight and the kept answers, each by the room's channel (the name
    a payload this instance publishes arrives with, see ``Hub.local``)."""

    def __init__(
        self,
        store: Store,
        history: HistoryCache,
        metrics: Metrics,
        spawn: Callable[[Coroutine[Any, Any, Answer], str], asyncio.Task[Answer]],
        *,
        max_age: float,
    ) -> None:
        self.store = store
        self.history = history
        self.metrics = metrics
        self.max_age = max_age
        self._spawn = spawn  # the hub's: its tasks end with it
        self._flights: dict[str, asyncio.Task[Answer]] = {}
        self._kept: OrderedDict[str, Answer] = OrderedDict()
        self._kept_bytes = 0

    def written(self, channel: str) -> None:
        """A write to the room was committed here or heard of: no later ``GET`` is
        answered from a read that began before it."""
        if self._flights:
            self._flights.pop(channel, None)
        if self._kept:
            self._drop(channel)

    async def read(self, room: str, channel: str, floor: int | None) -> bytes:
        """The room's answer at a seq at least ``floor`` (the room's seq key, read
        after the ``GET`` began; None: no key), from the kept answer, a read in
        flight, or a read of its own. Counted in ``chat_state_snapshots_total``: a
        read of the store as ``store``, an answer without one as ``memory``."""
        kept = self._kept.get(channel)
        if (
            kept is not None
            and floor is not None
            and kept.seq >= floor
            and asyncio.get_running_loop().time() - kept.at <= self.max_age
        ):
            self._kept.move_to_end(channel)
            self.metrics.state_snapshots.labels("memory").inc()
            return kept.body
        answer = await self._join(room, channel)
        if answer.seq < (floor or 0):
            # Read before a write acknowledged before this GET: the next read begins
            # after the key was read, so it holds that write.
            answer = await self._join(room, channel)
        return answer.body

    async def _join(self, room: str, channel: str) -> Answer:
        flight = self._flights.get(channel)
        if flight is None:
            flight = self._flights[channel] = self._spawn(
                self._load(room, channel), f"state-read-{room}"
            )
            flight.add_done_callback(_retrieved)
        else:
            self.metrics.state_snapshots.labels("memory").inc()
        # A GET that goes away leaves the read to the others waiting for it.
        return await asyncio.shield(flight)

    async def _load(self, room: str, channel: str) -> Answer:
        flight = asyncio.current_task()
        at = asyncio.get_running_loop().time()
        try:
            snapshot = await self.store.state(room)
        finally:
            current = self._flights.get(channel) is flight
            if current:
                del self._flights[channel]
        self.metrics.state_snapshots.labels("store").inc()
        answer = Answer(
            snapshot.seq,
            state_document(orjson.dumps(room), snapshot.seq, values_json(snapshot.entries)),
            at,
        )
        if current:  # no write was committed or heard of here since the read began
            self._keep(channel, answer)
        await self.history.loaded(room, snapshot.seq)
        return answer

    def _keep(self, channel: str, answer: Answer) -> None:
        self._drop(channel)
        size = len(answer.body)
        if size > KEPT_BYTES:
            return
        self._kept[channel] = answer
        self._kept_bytes += size
        while len(self._kept) > KEPT_ROOMS or self._kept_bytes > KEPT_BYTES:
            _, gone = self._kept.popitem(last=False)
            self._kept_bytes -= len(gone.body)

    def _drop(self, channel: str) -> None:
        gone = self._kept.pop(channel, None)
        if gone is not None:
            self._kept_bytes -= len(gone.body)


def _retrieved(task: asyncio.Task[Answer]) -> None:
    """A read's failure is its waiters' (a 503 each); none may be left waiting."""
    if not task.cancelled():
        task.exception()
