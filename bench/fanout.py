"""Fan-out: one publisher, S subscribers spread over several instances, M messages at R/s.

Each published text carries its index and send time (``bench:<i>:<ns>;``);
every subscriber checks that indexes arrive in order and once, and records
publish-to-receive latency. Server CPU is read from /proc over the publishing
window plus the drain, so deliveries per server CPU-second do not depend on
what else the machine runs.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from bench.profile import Profiler
from bench.stats import summary_ms
from bench.targets import Target
from bench.wsclient import WSClient

MARK = b"bench:"


class Receiver:
    __slots__ = ("last", "count", "out_of_order", "control")

    def __init__(self) -> None:
        self.last = -1
        self.count = 0
        self.out_of_order = 0
        self.control: asyncio.Queue[bytes] = asyncio.Queue()


async def connect(
    target: Target, host: str, port: int, room: str, latencies: list[float]
) -> tuple[WSClient, Receiver]:
    rx = Receiver()
    clock = time.perf_counter_ns

    def on_frame(client: WSClient, payload: bytes) -> None:
        j = payload.find(MARK)
        if j < 0:
            if not target.control(client, payload):
                rx.control.put_nowait(payload)
            return
        k = payload.index(b":", j + 6)
        i = int(payload[j + 6 : k])
        sent = int(payload[k + 1 : payload.index(b";", k)])
        latencies.append((clock() - sent) / 1e9)
        if i != rx.last + 1:
            rx.out_of_order += 1
        if i > rx.last:
            rx.last = i
        rx.count += 1

    client = await WSClient.connect(host, port, target.ws_path(room), on_frame)
    await target.subscribe(client, rx.control, room)
    return client, rx


async def run(
    target: Target,
    *,
    instances: int = 2,
    subscribers: int = 400,
    messages: int = 1000,
    rate: float = 100.0,
    drain: float = 60.0,
    idle: float = 3.0,
    profile: Path | None = None,
) -> dict[str, Any]:
    room = "fanout"
    servers = await target.start(instances)
    clients: list[WSClient] = []
    try:
        latencies: list[float] = []
        gate = asyncio.Semaphore(50)

        async def one(i: int) -> tuple[WSClient, Receiver]:
            async with gate:
                s = servers[i % len(servers)]
                return await connect(target, "127.0.0.1", s.port, room, latencies)

        pairs = await asyncio.gather(*(one(i) for i in range(subscribers)))
        clients = [c for c, _ in pairs]
        receivers = [r for _, r in pairs]
        # The publisher: its own socket on the first instance, not subscribed.
        pub_rx = Receiver()

        def on_pub(client: WSClient, payload: bytes) -> None:
            if not target.control(client, payload):
                pub_rx.control.put_nowait(payload)

        pub = await WSClient.connect("127.0.0.1", servers[0].port, target.ws_path(room), on_pub)
        clients.append(pub)
        if target.name != "gateway":
            await target.subscribe(pub, pub_rx.control, room + "-publisher")
        await asyncio.sleep(1.0)
        latencies.clear()

        expected = subscribers * messages
        profiler = Profiler(profile / target.name if profile else None)
        profiler.start(servers, messages / rate)
        cpu0 = target.cpu()
        client0 = time.process_time()
        t0 = time.perf_counter()
        for i in range(messages):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            text = f"bench:{i}:{time.perf_counter_ns()};"
            pub.send_text(target.publish_frame(room, text, i))
        # Drain: wait while deliveries still arrive (a loaded client lags, it does not
        # lose), give up after `idle` seconds without progress or `drain` in all.
        sent_at = last_progress = time.perf_counter()
        seen = -1
        while time.perf_counter() - sent_at < drain:
            got = sum(r.count for r in receivers)
            if got >= expected:
                break
            if got != seen:
                seen, last_progress = got, time.perf_counter()
            elif time.perf_counter() - last_progress > idle:
                break
            await asyncio.sleep(0.05)
        wall = time.perf_counter() - t0
        cpu = target.cpu() - cpu0
        client_cpu = time.process_time() - client0
        delivered = sum(r.count for r in receivers)
        profiler.finish()
        return {
            "target": target.name,
            "persists": target.persists,
            "instances": instances,
            "subscribers": subscribers,
            "messages": messages,
            "rate": rate,
            "expected": expected,
            "delivered": delivered,
            "delivery_ratio": round(delivered / expected, 6) if expected else None,
            "complete_subscribers": sum(1 for r in receivers if r.count == messages),
            "out_of_order": sum(r.out_of_order for r in receivers),
            **summary_ms(latencies),
            "server_cpu_s": round(cpu, 3),
            "client_cpu_s": round(client_cpu, 3),
            "wall_s": round(wall, 3),
            "deliveries_per_cpu_s": round(delivered / cpu) if cpu > 0 else None,
        }
    finally:
        for c in clients:
            c.close()
        await asyncio.sleep(0.2)
        await target.stop()
