"""Webhooks: delivery latency from commit, throughput per instance, cost of a dead receiver.

One gateway instance on Postgres posts to a receiver in this process (a bare
HTTP/1.1 server answering at once).

1. latency: posts paced at ``rate``/s over ``rooms`` rooms; for each message,
   the time from its commit (``created_at``) to the receiver reading its
   webhook (both clocks are this machine's).
2. throughput: with the receiver down, ``backlog`` messages are posted and
   that instance is stopped; the receiver comes back and a fresh instance
   (``concurrency`` attempts in flight) drains the outbox: events per second
   from the first delivery to the last, and that instance's CPU per event.
3. dead receiver: a receiver that answers 500 to everything, ``rooms`` queues
   pending, a short backoff (0.1..1 s, so without the breaker every queue would
   retry several times a second) and the default breaker (5 failures, 30 s
   cool-down): attempts per minute over ``dead_seconds``.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from typing import Any

import orjson

from bench.http import HTTPConn
from bench.procs import free_port
from bench.stats import summary_ms
from bench.targets import Gateway
from chat_gateway.storage.base import parse_ts


class Receiver:
    """Counts webhooks; answers ``status`` (200 unless told otherwise)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.status = 200
        self.got: list[tuple[float, dict[str, Any]]] = []  # (wall time, payload)
        self.attempts = 0
        self.answering = asyncio.Event()  # cleared: requests are read and held unanswered
        self.answering.set()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Down: refuses connections, and the open ones are cut."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._conns):
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                await self.answering.wait()
                self.attempts += 1
                if self.status == 200:
                    self.got.append((time.time(), orjson.loads(body)))
                writer.write(b"HTTP/1.1 %d X\r\ncontent-length: 0\r\n\r\n" % self.status)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()


def _env(receiver: Receiver, **extra: str) -> dict[str, str]:
    return {
        "WEBHOOK_URLS": receiver.url,
        "WEBHOOK_SECRET": "whsec_" + base64.b64encode(os.urandom(32)).decode(),
        "WEBHOOK_ALLOW_PRIVATE": "true",
        **extra,
    }


async def _post(
    port: int, count: int, rooms: int, connections: int = 8, rate: float | None = None
) -> int:
    """Post ``count`` messages over ``rooms`` rooms (paced at ``rate``/s when given)."""
    start = time.perf_counter()
    next_i = 0
    stored = 0

    async def worker() -> None:
        nonlocal next_i, stored
        conn = HTTPConn("127.0.0.1", port)
        try:
            while next_i < count:
                i = next_i
                next_i += 1
                if rate is not None:
                    delay = start + i / rate - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                status, _ = await conn.request(
                    "POST",
                    f"/v1/rooms/hooks-{i % rooms}/messages",
                    {"text": f"m{i}", "author": "bench"},
                )
                stored += status == 201
        finally:
            await conn.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return stored


async def _until(check: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.05)
    return False


async def run(
    *,
    rooms: int = 50,
    rate: float = 25.0,
    seconds: float = 8.0,
    backlog: int = 5000,
    dead_seconds: float = 60.0,
    concurrency: int = 16,
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    receiver = Receiver()
    await receiver.start()
    target = Gateway()
    try:
        env = _env(receiver, WEBHOOK_BACKOFF="0.1,1", WEBHOOK_BREAKER_COOLDOWN="1")
        (server,) = await target.start(1, env)
        # 1. latency from commit, at a steady rate
        count = int(rate * seconds)
        stored = await _post(server.port, count, rooms, rate=rate)
        await _until(lambda: len(receiver.got) >= stored, 60)
        latencies = [at - parse_ts(p["data"]["created_at"]) / 1000 for at, p in receiver.got]
        rows.append(
            {
                "phase": "latency",
                "events": len(receiver.got),
                "offered_per_s": rate,
                "rooms": rooms,
                **summary_ms(latencies),
            }
        )

        # 2. throughput: a backlog drained once the receiver is back
        await receiver.stop()
        receiver.got.clear()
        stored = await _post(server.port, backlog, rooms)
        server.stop()
        target.servers.remove(server)
        receiver.answering.clear()  # held until the new instance's CPU is read
        await receiver.start()
        server = target.make_server(1, {**env, "WEBHOOK_CONCURRENCY": str(concurrency)}).start()
        target.servers.append(server)
        await server.wait_ready(target.ready_path)
        cpu0 = server.cpu()
        receiver.answering.set()
        await _until(lambda: len(receiver.got) >= stored, 600)
        if receiver.got:
            first, last = receiver.got[0][0], receiver.got[-1][0]
            span = max(last - first, 1e-6)
            cpu = server.cpu() - cpu0
            rows.append(
                {
                    "phase": "throughput",
                    "events": len(receiver.got),
                    "rooms": rooms,
                    "concurrency": concurrency,
                    "events_per_s": round(len(receiver.got) / span),
                    "server_cpu_ms_per_event": round(cpu / len(receiver.got) * 1000, 3),
                }
            )
        await target.stop()

        # 3. a receiver that fails everything, with the default breaker
        receiver.status = 500
        receiver.attempts = 0
        target = Gateway()
        (server,) = await target.start(
            1, _env(receiver, WEBHOOK_BACKOFF="0.1,1", WEBHOOK_MAX_ATTEMPTS="100000")
        )
        await _post(server.port, rooms, rooms)
        t0 = time.monotonic()
        await _until(lambda: receiver.attempts > 0, 10)
        burst_end = time.monotonic() + 2
        await asyncio.sleep(max(0.0, burst_end - time.monotonic()))
        burst = receiver.attempts
        await asyncio.sleep(max(0.0, dead_seconds - (time.monotonic() - t0)))
        window = time.monotonic() - t0
        rows.append(
            {
                "phase": "dead receiver",
                "rooms": rooms,
                "seconds": round(window, 1),
                "attempts": receiver.attempts,
                "first_2s": burst,
                "attempts_per_min": round(receiver.attempts / window * 60, 1),
            }
        )
    finally:
        await target.stop()
        await receiver.stop()
    return rows
