"""Idle connections: N WebSocket sockets on one instance, each subscribed to a room:
one of ``rooms`` shared rooms, or (``rooms=0``) a room of its own; then a few
messages to one room, and how long until the last of its subscribers has each.

Resident memory per connection is the server's RSS growth over N (after a
short warm-up, so code loaded once is not charged to the sockets); idle CPU
is the server's CPU time over a quiet window, as a percentage of one core.

The sockets live in client processes of their own (at most ``PER_PROCESS``
each, under the usual open-files limit of 20,000), and connect from several
loopback source addresses, 127.0.0.2, 127.0.0.3, ... (at most ``PER_SOURCE``
each: one source address has about 28,000 ephemeral ports towards one server
port). The bench raises its open-files limit to the hard limit, which the
server inherits; past it the server refuses sockets and the row says how many
it held (``failed``). Holding 100,000 sockets on one instance needs a hard
limit above that, e.g. ``ulimit -Hn 1048576`` as root (or ``LimitNOFILE=`` in
a unit, ``--ulimit nofile=`` for a container) before ``python -m bench idle
--connections 100000``.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.fanout import ClientProcess, Receiver, connect
from bench.idle_clients import room_of
from bench.procs import open_files_limit
from bench.stats import summary_ms
from bench.targets import Target
from bench.wsclient import WSClient

ROOMS = 100
WARMUP = 20
PER_PROCESS = 15_000
PER_SOURCE = 25_000
MESSAGES = 5  # to one room, one after the other once each has reached every subscriber
GIB_KIB = 1024 * 1024


async def run(
    target: Target,
    *,
    connections: int = 10000,
    settle: float = 10.0,
    rooms: int = ROOMS,
    messages: int = MESSAGES,
) -> dict[str, Any]:
    (server,) = await target.start(1)
    warm: list[WSClient] = []
    procs: list[ClientProcess] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-idle-"))
    try:
        limit = open_files_limit(server.pid)
        if limit is not None and connections + 100 > limit:
            print(
                f"bench: the server may open {limit} files: it cannot hold {connections} "
                "sockets (raise the hard limit, see bench/idle.py)",
                file=sys.stderr,
                flush=True,
            )
        latencies: list[float] = []
        for i in range(WARMUP):
            client, _ = await connect(target, "127.0.0.1", server.port, f"warm-{i}", latencies)
            warm.append(client)
        await asyncio.sleep(1.0)
        rss0 = server.rss()

        rest = list(range(WARMUP, connections))
        n_procs = max(1, math.ceil(len(rest) / PER_PROCESS))
        n_sources = max(1, math.ceil(len(rest) / PER_SOURCE))
        sources = [f"127.0.0.{2 + k}" for k in range(max(n_sources, n_procs))]
        for k in range(n_procs):
            config = {
                "target": target.key,
                "port": server.port,
                "rooms": rooms,
                "indexes": rest[k::n_procs],
                # each process its own source addresses when there are enough
                "sources": sources[k::n_procs] or sources,
                "out": str(tmp / f"idle{k}.json"),
            }
            procs.append(await ClientProcess.start(config, "bench.idle_clients"))
        for p in procs:
            await p.wait(p.ready, 120)
        t0 = time.perf_counter()
        for p in procs:
            p.tell(b"go")
        for p in procs:
            await p.wait(p.connected, 3600)
        connect_s = time.perf_counter() - t0
        held = sum(p.sockets for p in procs)
        failed = sum(p.failed for p in procs)
        await asyncio.sleep(2.0)
        rss1 = server.rss()
        cpu0 = server.cpu()
        await asyncio.sleep(settle)
        cpu = server.cpu() - cpu0

        room = room_of(WARMUP, rooms)
        members = sum(1 for i in rest if room_of(i, rooms) == room)
        broadcast = await _broadcast(target, server.port, procs, room, members, messages)
        for p in procs:
            p.tell(b"stop")
        for p in procs:
            await p.wait(p.done, 120)
        heard = [x for p in procs for x in p.result()["latencies"]]
        broadcast.update({f"room_{k}": v for k, v in summary_ms(heard).items()})
        per_conn = (rss1 - rss0) / held if held > 0 else None
        return {
            "target": target.name,
            "connections": held + len(warm),
            "rooms": rooms or held + len(warm),
            "failed": failed,
            "client_procs": n_procs,
            "source_addresses": len(sources),
            "connect_s": round(connect_s, 2),
            "accepts_per_s": round(held / connect_s) if connect_s > 0 else None,
            "rss_before_kib": rss0,
            "rss_after_kib": rss1,
            "rss_per_conn_kib": round(per_conn, 2) if per_conn else None,
            "connections_per_gib": round(GIB_KIB / per_conn) if per_conn else None,
            "idle_cpu_pct": round(100 * cpu / settle, 2),
            "open_files_limit": limit,
            **broadcast,
        }
    finally:
        for c in warm:
            c.close()
        for p in procs:
            if not p.done.is_set() and p.proc.returncode is None:
                p.proc.kill()
            await p.close()
        await asyncio.sleep(0.5)
        await target.stop()
        shutil.rmtree(tmp, ignore_errors=True)


async def _broadcast(
    target: Target,
    port: int,
    procs: list[ClientProcess],
    room: str,
    subscribers: int,
    messages: int,
) -> dict[str, Any]:
    """``messages`` messages to ``room``, each once the one before has reached every
    subscriber there (or 60 s passed): the time until the last subscriber has it
    and deliveries per server core-second (the publish-to-receive p50/p99 over all
    come from the client processes)."""
    rx = Receiver()

    def on_frame(client: WSClient, payload: bytes) -> None:
        if not target.control(client, payload):
            rx.control.put_nowait(payload)

    pub = await target.open("127.0.0.1", port, room, on_frame)
    try:
        await target.prepare_publisher(pub, rx.control, room)
        await asyncio.sleep(0.5)
        base = sum(p.count for p in procs)
        lasts: list[float] = []
        cpu0 = target.cpu()
        t_all = time.perf_counter()
        for i in range(messages):
            t0 = time.perf_counter()
            pub.send_text(target.publish_frame(room, f"bench:{i}:{time.perf_counter_ns()};", i))
            want = base + subscribers * (i + 1)
            # until every subscriber has it, or nothing more arrived for 2 s (a
            # socket the server refused is counted among the room's members)
            got, moved = -1, time.perf_counter()
            while time.perf_counter() - t0 < 60:
                now_got = sum(p.count for p in procs)
                if now_got >= want:
                    moved = time.perf_counter()
                    break
                if now_got != got:
                    got, moved = now_got, time.perf_counter()
                elif time.perf_counter() - moved > 2.0:
                    break
                await asyncio.sleep(0.01)
            lasts.append(moved - t0)  # when the last copy seen arrived
            await asyncio.sleep(0.5)
        cpu = target.cpu() - cpu0
        window = time.perf_counter() - t_all
    finally:
        pub.close()
    await asyncio.sleep(0.2)
    delivered = sum(p.count for p in procs) - base
    return {
        "room_subscribers": subscribers,
        "room_messages": messages,
        "room_delivered": delivered,
        "last_receive_ms": round(1000 * statistics.median(lasts), 1) if lasts else None,
        "last_receive_max_ms": round(1000 * max(lasts), 1) if lasts else None,
        "room_window_s": round(window, 2),
        "room_server_cpu_s": round(cpu, 3),
        "deliveries_per_core_s": round(delivered / cpu) if cpu > 0 else None,
    }
