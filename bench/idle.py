"""Idle connections: N WebSocket sockets on one instance, each subscribed to a room
(one of ``rooms``, or with ``rooms=0`` a room of its own).

Resident memory per connection is the server's RSS growth over N (after a
short warm-up, so code loaded once is not charged to the sockets); idle CPU
is the server's CPU time over a quiet window, as a percentage of one core.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.fanout import connect
from bench.procs import open_files_limit
from bench.targets import Target
from bench.wsclient import WSClient

ROOMS = 100
WARMUP = 20


async def run(
    target: Target, *, connections: int = 10000, settle: float = 10.0, rooms: int = ROOMS
) -> dict[str, Any]:
    (server,) = await target.start(1)
    clients: list[WSClient] = []
    try:
        latencies: list[float] = []
        gate = asyncio.Semaphore(100)
        failures = 0

        async def one(i: int) -> None:
            nonlocal failures
            async with gate:
                try:
                    client, _ = await connect(
                        target,
                        "127.0.0.1",
                        server.port,
                        f"idle-{i % rooms if rooms else i}",
                        latencies,
                    )
                except (TimeoutError, OSError, ConnectionError):
                    failures += 1
                    return
                clients.append(client)

        await asyncio.gather(*(one(i) for i in range(WARMUP)))
        await asyncio.sleep(1.0)
        rss0 = server.rss()
        t0 = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(WARMUP, connections)))
        connect_s = time.perf_counter() - t0
        await asyncio.sleep(2.0)
        rss1 = server.rss()
        cpu0 = server.cpu()
        await asyncio.sleep(settle)
        cpu = server.cpu() - cpu0
        grown = len(clients) - WARMUP
        return {
            "target": target.name,
            "connections": len(clients),
            "rooms": min(rooms, connections) if rooms else connections,
            "failed": failures,
            "connect_s": round(connect_s, 2),
            "rss_before_kib": rss0,
            "rss_after_kib": rss1,
            "rss_per_conn_kib": round((rss1 - rss0) / grown, 2) if grown > 0 else None,
            "idle_cpu_pct": round(100 * cpu / settle, 2),
            "open_files_limit": open_files_limit(server.pid),
        }
    finally:
        for c in clients:
            c.close()
        await asyncio.sleep(0.5)
        await target.stop()
