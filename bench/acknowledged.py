"""Acknowledged posts and their delivery check, shared by the failover drill
(``python -m bench.failover_drill``) and the failover tests: a ``Writer`` posting
round robin over gateways until stopped, a WS and an SSE subscriber per room on
every gateway (``subscribers``), and the check that every subscriber got every
acknowledged message in order, once (``delivered_in_order_once``). It drives real
gateway processes through the harness's clients, as the rest of the bench does."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator

import httpx

from tests.harness import Instance, SSEClient, WSClient, eventually, post, t


class Writer:
    """Posts to the rooms round robin over the gateways until stopped; keeps what was
    acknowledged (seq and when) and every other answer."""

    def __init__(
        self,
        gws: list[Instance],
        http: httpx.AsyncClient,
        rooms: list[str],
        keyed: bool = False,
        give_up: float = 20,
    ) -> None:
        self.gws, self.http, self.rooms, self.keyed = gws, http, rooms, keyed
        self.give_up = give_up  # seconds a keyed post is retried for
        self.acked: dict[str, list[int]] = {room: [] for room in rooms}
        self.acked_at: list[float] = []
        self.statuses: list[int] = []  # 201 new, 200 a retry answered with the stored one
        self.failed: list[tuple[int, str]] = []
        self.retried_same = 0
        self.stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def count(self, status: int | None = None) -> int:
        if status is not None:
            return self.statuses.count(status)
        return sum(len(v) for v in self.acked.values())

    async def _one(self, i: int) -> None:
        room = self.rooms[i % len(self.rooms)]
        headers = {"Idempotency-Key": f"k-{i}"} if self.keyed else {}
        deadline = time.monotonic() + t(self.give_up)
        for attempt in itertools.count():  # a keyed post is retried until it is answered
            g = self.gws[(i + attempt) % len(self.gws)]
            try:
                r = await post(self.http, g.url, room, f"m{i}", headers=headers)
            except httpx.HTTPError as exc:
                self.failed.append((0, repr(exc)))
                r = None
            if r is not None and r.status_code in (200, 201):
                self.acked[room].append(r.json()["seq"])
                self.acked_at.append(time.monotonic())
                self.statuses.append(r.status_code)
                return
            if r is not None:
                self.failed.append((r.status_code, r.text))
                assert r.status_code == 503, r.text  # never a 500
            if not self.keyed:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"post {i} never answered: {self.failed[-3:]}")
            await asyncio.sleep(0.1)

    async def _run(self) -> None:
        i = 0
        while not self.stop.is_set():
            await self._one(i)
            i += 1
            await asyncio.sleep(0.01)

    def start(self) -> Writer:
        self._task = asyncio.create_task(self._run())
        return self

    async def finish(self) -> None:
        self.stop.set()
        assert self._task is not None
        await self._task

    async def until(self, count: int, timeout: float = 30) -> None:
        await eventually(
            lambda: self.count() >= count or (self._task is not None and self._task.done()), timeout
        )
        if self._task is not None and self._task.done():
            await self._task  # its assertion


@contextlib.asynccontextmanager
async def subscribers(
    gws: list[Instance], rooms: list[str]
) -> AsyncIterator[tuple[list[WSClient], dict[str, list[SSEClient]]]]:
    """A WS subscriber on every gateway for every room, and an SSE stream per room
    on every gateway."""
    async with contextlib.AsyncExitStack() as stack:
        wss = []
        for n, g in enumerate(gws):
            # Frames are read only at the end: an unbounded buffer keeps the socket
            # read meanwhile, so keepalive pings are answered through a long switch.
            ws = await stack.enter_async_context(
                WSClient.connect(f"{g.ws_url}?user=ws{n}", max_queue=None)
            )
            for room in rooms:
                await ws.subscribe(room)
            wss.append(ws)
        sses = {
            room: [
                await stack.enter_async_context(
                    SSEClient.open(f"{g.url}/v1/rooms/{room}/events?user=sse{n}")
                )
                for n, g in enumerate(gws)
            ]
            for room in rooms
        }
        yield wss, sses


async def delivered_in_order_once(
    writer: Writer, wss: list[WSClient], sses: dict[str, list[SSEClient]]
) -> None:
    for room, seqs in writer.acked.items():
        n = len(seqs)
        assert sorted(seqs) == list(range(1, n + 1)), f"room {room}: acked seqs {seqs}"
        for ws in wss:
            assert await ws.messages(room, n, timeout=30) == list(range(1, n + 1))
        for sse in sses[room]:
            assert await sse.wait_for(n, timeout=30) == list(range(1, n + 1))
    await asyncio.sleep(t(1))  # and nothing arrives twice later
    for room, seqs in writer.acked.items():
        want = list(range(1, len(seqs) + 1))
        assert all(ws.seqs(room) == want for ws in wss)
        assert all(sse.seqs() == want for sse in sses[room])
