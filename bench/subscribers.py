"""A client process holding its share of a fan-out run's subscribers.

``python -m bench.subscribers CONFIG`` (JSON: target, ports, room, indexes,
messages, out). It connects and subscribes its sockets, says ``ready``, and
from ``mark`` on stdin counts deliveries (``count N`` on stdout every 50 ms)
and records publish-to-receive latencies and its own CPU; on ``stop`` it
writes what it measured to the ``out`` file and says ``done``. The publisher's
clock and this process's are the same (``perf_counter_ns`` is the machine's
monotonic clock), so latencies are comparable across processes.
"""

from __future__ import annotations

import asyncio
import sys
import time
from typing import Any

from bench.clientproc import finish, run, say
from bench.fanout import Receiver, connect
from bench.targets import TARGETS
from bench.wsclient import WSClient


async def main(cfg: dict[str, Any]) -> None:
    target = TARGETS[cfg["target"]]()
    ports: list[int] = cfg["ports"]
    latencies: list[float] = []
    gate = asyncio.Semaphore(50)

    async def one(i: int) -> tuple[WSClient, Receiver]:
        async with gate:
            return await connect(target, "127.0.0.1", ports[i % len(ports)], cfg["room"], latencies)

    pairs = await asyncio.gather(*(one(i) for i in cfg["indexes"]))
    receivers = [r for _, r in pairs]
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    say("ready")
    assert (await stdin.readline()).strip() == b"mark"
    latencies.clear()
    cpu0, t0 = time.process_time(), time.perf_counter()

    async def tick() -> None:
        seen = -1
        while True:
            got = sum(r.count for r in receivers)
            if got != seen:
                say(f"count {got}")
                seen = got
            await asyncio.sleep(0.05)

    ticker = asyncio.create_task(tick())
    assert (await stdin.readline()).strip() == b"stop"
    ticker.cancel()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    messages = cfg["messages"]
    result = {
        "subscribers": len(receivers),
        "delivered": sum(r.count for r in receivers),
        "complete_subscribers": sum(1 for r in receivers if r.count == messages),
        "out_of_order": sum(r.out_of_order for r in receivers),
        "cpu_s": cpu,
        "wall_s": wall,
        "latencies": latencies,
    }
    await finish(cfg["out"], result, (c for c, _ in pairs), 0.2)


if __name__ == "__main__":
    run(main)
