"""A client process holding its share of an idle run's sockets.

``python -m bench.idle_clients CONFIG`` (JSON: target, port, rooms, indexes,
sources, out). It says ``ready``; on ``go`` it connects and subscribes its
sockets, each from one of the loopback ``sources`` in turn (one source address
gives about 28,000 ephemeral ports towards one server), and says
``connected N FAILED``; then it counts the bench's marked messages (``count N``
on stdout every 100 ms, once it changes) with each one's publish-to-receive
time; on ``stop`` it writes them to the ``out`` file and says ``done``. The
publisher's clock and this process's are the machine's monotonic clock.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from bench.clientproc import finish, run, say
from bench.fanout import connect
from bench.targets import TARGETS
from bench.wsclient import WSClient

MARK = b"bench:"


def room_of(i: int, rooms: int) -> str:
    return f"idle-{i % rooms if rooms else i}"


async def main(cfg: dict[str, Any]) -> None:
    target = TARGETS[cfg["target"]]()
    sources: list[str] = cfg["sources"]
    rooms: int = cfg["rooms"]
    latencies: list[float] = []
    clients: list[WSClient] = []
    failed = 0
    gate = asyncio.Semaphore(cfg.get("concurrency", 200))

    async def one(i: int) -> None:
        nonlocal failed
        async with gate:
            try:
                client, _ = await connect(
                    target,
                    "127.0.0.1",
                    cfg["port"],
                    room_of(i, rooms),
                    latencies,
                    local_addr=(sources[i % len(sources)], 0),
                )
            except (TimeoutError, OSError, ConnectionError):
                failed += 1
                return
            clients.append(client)

    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    say("ready")
    assert (await stdin.readline()).strip() == b"go"
    await asyncio.gather(*(one(i) for i in cfg["indexes"]))
    say(f"connected {len(clients)} {failed}")

    async def tick() -> None:
        seen = -1
        while True:
            if len(latencies) != seen:
                seen = len(latencies)
                say(f"count {seen}")
            await asyncio.sleep(0.1)

    ticker = asyncio.create_task(tick())
    assert (await stdin.readline()).strip() == b"stop"
    ticker.cancel()
    await finish(cfg["out"], {"connected": len(clients), "latencies": latencies}, clients, 0.5)


if __name__ == "__main__":
    run(main)
