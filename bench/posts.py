"""Posts: HTTP POST throughput and latency with Postgres persistence.

C keep-alive connections per instance, each posting to a random one of R
rooms. The first second is warm-up and not counted.

Without a rate the connections post back to back (a closed loop): the run
finds the most posts/s the machine gives, and its latency is that of a
saturated machine. With a rate, posts are due at that rate per instance
whether or not earlier ones were answered (an open loop): the run asks
whether the instances keep up with that load and how long a post takes at it.
Latency is then counted from when a post was due, not from when a free
connection sent it, so a server that falls behind is not flattered by its
clients waiting for it. A post due in the measured window but not sent by its
end is not counted (the servers did not keep up with it); it is still sent,
up to LATE_GRACE after the end, and its answer checked, so the report says
how many posts were due on each instance and what became of each one.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

from bench.http import HTTPConn
from bench.procs import MachineMeter
from bench.profile import Profiler
from bench.stats import summary_ms
from bench.targets import Gateway
from bench.verdict import POSTS_PER_INSTANCE

WARMUP = 1.0
LATE_GRACE = 5.0  # seconds after the run a post due within it may still be sent


async def run(
    *,
    instances: int = 2,
    connections: int = 32,
    rooms: int = 200,
    seconds: float = 10.0,
    rate: float | None = None,
    profile: Path | None = None,
) -> dict[str, Any]:
    target = Gateway()
    servers = await target.start(instances)
    try:
        latencies: list[float] = []
        counts = [0] * instances
        errors = 0
        start = time.perf_counter()
        measure_from = start + WARMUP
        deadline = measure_from + seconds
        cpu0: list[float] = []
        profiler = Profiler(profile / "posts" if profile else None)
        meter = MachineMeter()
        await meter.find()
        tickets = [0] * instances  # open loop: the next post due on each instance
        due = [0] * instances  # posts due in the measured window
        late = [0] * instances  # of those, sent after its end and answered 201
        unsent = [0] * instances  # of those, not sent even LATE_GRACE after its end
        at_end: dict[str, Any] = {}
        on_time = instances * connections  # workers still posting within the run

        def run_over() -> None:
            """The last worker past the run's end reads the CPU: what the counted
            posts cost, not the late ones sent afterwards."""
            nonlocal on_time
            on_time -= 1
            if on_time == 0:
                at_end.update(
                    cpu=target.cpu(), client=time.process_time(), machine=meter.since_mark()
                )

        async def worker(k: int, w: int) -> None:
            nonlocal errors
            conn = HTTPConn("127.0.0.1", servers[k].port)
            rng = random.Random(k * 100003 + w)
            within = True
            try:
                while True:
                    if rate is None:
                        now = time.perf_counter()
                    else:
                        now = start + tickets[k] / rate
                        tickets[k] += 1
                        if measure_from <= now < deadline:
                            due[k] += 1
                        delay = now - time.perf_counter()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    if now >= deadline:
                        break
                    sent = time.perf_counter()
                    if sent >= deadline and within:
                        within = False
                        run_over()
                    if not within and (rate is None or sent >= deadline + LATE_GRACE):
                        if rate is not None and now >= measure_from:
                            unsent[k] += 1
                        continue
                    room = f"posts-{rng.randrange(rooms)}"
                    status, _ = await conn.request(
                        "POST",
                        f"/v1/rooms/{room}/messages",
                        {"text": "hello from the bench", "author": "bench"},
                    )
                    done = time.perf_counter()
                    if now >= measure_from:
                        if status != 201:
                            errors += 1
                        elif within:
                            counts[k] += 1
                            latencies.append(done - now)
                        else:
                            late[k] += 1
            finally:
                if within:
                    run_over()
                await conn.close()

        async def mark_cpu() -> None:
            await asyncio.sleep(measure_from - time.perf_counter())
            cpu0.append(target.cpu())
            cpu0.append(time.process_time())
            meter.mark()
            profiler.start(servers, seconds)

        await asyncio.gather(
            mark_cpu(), *(worker(k, w) for k in range(instances) for w in range(connections))
        )
        cpu = at_end["cpu"] - cpu0[0]
        client_cpu = at_end["client"] - cpu0[1]
        machine: dict[str, float | None] = at_end["machine"]
        profiler.finish()
        total = sum(counts)

        def per_post(cpu_s: float | None) -> float | None:
            return round(cpu_s / total * 1000, 3) if total and cpu_s is not None else None

        parts = [cpu, machine["postgres_cpu_s"], machine["redis_cpu_s"], client_cpu]
        all_ms = per_post(sum(p for p in parts if p is not None)) if None not in parts else None
        return {
            "target": target.name,
            "instances": instances,
            "connections": connections * instances,
            "offered_per_s_per_instance": rate,
            "rooms": rooms,
            "seconds": seconds,
            "posts": total,
            "errors": errors,
            "posts_per_s": round(total / seconds),
            "per_instance": counts,
            # paced: the posts due on each instance in the window, and of those the
            # ones the client sent after its end (answered, not counted) or not at all
            "due_per_instance": due if rate is not None else None,
            "late_per_instance": late if rate is not None else None,
            "unsent_per_instance": unsent if rate is not None else None,
            "posts_per_s_per_instance": round(total / seconds / instances),
            **summary_ms(latencies),
            "server_cpu_s": round(cpu, 2),
            # What a post costs the gateway, whatever else the machine is doing:
            # the figure to compare between runs; posts/s moves with the load.
            "server_cpu_ms_per_post": per_post(cpu),
            # The load generator shares the machine's cores with the servers.
            "client_cpu_s": round(client_cpu, 2),
            # What a post costs every process it runs through; the cores that
            # the target's rate would take at these costs; the hypervisor's share.
            "postgres_cpu_ms_per_post": per_post(machine["postgres_cpu_s"]),
            "redis_cpu_ms_per_post": per_post(machine["redis_cpu_s"]),
            "client_cpu_ms_per_post": per_post(client_cpu),
            "machine_cpu_ms_per_post": all_ms,
            "cores_for_target": (
                round(all_ms * POSTS_PER_INSTANCE * instances / 1000, 2)
                if all_ms is not None
                else None
            ),
            "steal_pct": machine["steal_pct"],
        }
    finally:
        await target.stop()
