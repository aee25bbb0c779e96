"""Many rooms: what holding rooms costs an idle gateway.

The same S sockets, spread over the instances, first in a few shared rooms
(socket i in room ``i % few``), then each in a room of its own (each leaves its
shared room and joins its own). Over a quiet window after each, the CPU of the
gateway processes as a percentage of one core: the second over the first is
what the rooms themselves cost while nothing is said in them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from bench.fanout import Receiver, connect
from bench.targets import Gateway, expect
from bench.wsclient import WSClient


async def run(
    *, instances: int = 2, many: int = 3000, few: int = 30, window: float = 20.0
) -> list[dict[str, Any]]:
    target = Gateway()
    servers = await target.start(instances)
    sockets: list[tuple[int, WSClient, Receiver]] = []
    try:
        latencies: list[float] = []
        gate = asyncio.Semaphore(100)

        async def one(i: int) -> None:
            async with gate:
                s = servers[i % len(servers)]
                client, rx = await connect(
                    target, "127.0.0.1", s.port, f"rooms-{i % few}", latencies
                )
                sockets.append((i, client, rx))

        await asyncio.gather(*(one(i) for i in range(many)))
        rows = [await measure(target, len(sockets), few, window)]

        async def move(i: int, client: WSClient, rx: Receiver) -> None:
            async with gate:
                client.send_text(orjson.dumps({"type": "unsubscribe", "room": f"rooms-{i % few}"}))
                await expect(rx.control, b'"unsubscribed"')
                client.send_text(orjson.dumps({"type": "subscribe", "room": f"rooms-own-{i}"}))
                await expect(rx.control, b'"subscribed"')

        await asyncio.gather(*(move(i, c, rx) for i, c, rx in sockets))
        rows.append(await measure(target, len(sockets), many, window))
        base = rows[0]["idle_cpu_pct"]
        rows[1]["cpu_vs_fewest"] = round(rows[1]["idle_cpu_pct"] / base, 2) if base > 0 else None
        for row in rows:
            row["instances"] = instances
        return rows
    finally:
        for _, client, _ in sockets:
            client.close()
        await asyncio.sleep(0.5)
        await target.stop()


async def measure(target: Gateway, sockets: int, rooms: int, window: float) -> dict[str, Any]:
    await asyncio.sleep(min(2.0, window))  # let the joins and leaves settle
    cpu0, t0 = target.cpu(), time.perf_counter()
    await asyncio.sleep(window)
    cpu, wall = target.cpu() - cpu0, time.perf_counter() - t0
    return {
        "target": target.name,
        "sockets": sockets,
        "rooms": rooms,
        "window_s": round(wall, 2),
        "server_cpu_s": round(cpu, 3),
        "idle_cpu_pct": round(100 * cpu / wall, 2),
    }
