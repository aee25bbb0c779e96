"""Fan-out: one publisher, S subscribers spread over several instances, M messages at R/s.

Each published text carries its index and send time (``bench:<i>:<ns>;``);
every subscriber checks that indexes arrive in order and once, and records
publish-to-receive latency. Server CPU is read from /proc over the publishing
window plus the drain, so deliveries per server CPU-second do not depend on
what else the machine runs.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from bench.procs import ROOT
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
    target: Target,
    host: str,
    port: int,
    room: str,
    latencies: list[float],
    local_addr: tuple[str, int] | None = None,
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

    client = await target.open(host, port, room, on_frame, local_addr)
    await target.subscribe(client, rx.control, room)
    return client, rx


class ClientProcess:
    """One ``python -m bench.subscribers`` process and what it says."""

    def __init__(self, proc: asyncio.subprocess.Process, out: Path) -> None:
        self.proc = proc
        self.out = out
        self.count = 0
        self.ready = asyncio.Event()
        self.up = asyncio.Event()  # bench.state_subscribers: started, awaiting ``connect``
        self.done = asyncio.Event()
        # bench.idle_clients says how many sockets it opened ("connected N FAILED")
        self.connected = asyncio.Event()
        self.sockets = self.failed = 0
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def start(
        cls, config: dict[str, Any], module: str = "bench.subscribers"
    ) -> ClientProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            module,
            orjson.dumps(config).decode(),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        return cls(proc, Path(config["out"]))

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            if line.startswith(b"count "):
                self.count = int(line[6:])
            elif line.startswith(b"connected "):
                self.sockets, self.failed = map(int, line.split()[1:3])
                self.connected.set()
            elif line.strip() == b"up":
                self.up.set()
            elif line.strip() == b"ready":
                self.ready.set()
            elif line.strip() == b"done":
                self.done.set()

    async def wait(self, event: asyncio.Event, timeout: float) -> None:
        waiter = asyncio.create_task(event.wait())
        await asyncio.wait(
            {waiter, self.reader}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if not event.is_set():
            waiter.cancel()
            raise RuntimeError(f"a subscriber process failed (exit {self.proc.returncode})")

    def tell(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + b"\n")

    def result(self) -> dict[str, Any]:
        result: dict[str, Any] = orjson.loads(self.out.read_bytes())
        return result

    async def close(self) -> None:
        if self.proc.returncode is None:
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.reader.cancel()
        self.out.unlink(missing_ok=True)


async def run(
    target: Target,
    *,
    instances: int = 2,
    subscribers: int = 400,
    messages: int = 1000,
    rate: float = 100.0,
    client_procs: int = 1,
    drain: float = 60.0,
    idle: float = 3.0,
    profile: Path | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The subscribers live in ``client_procs`` processes of their own, the
    publisher in this one, so the client's CPU of each part is its own.
    ``env``: more variables for the servers (the write-delay sweep's)."""
    room = "fanout"
    servers = await target.start(instances, env)
    procs: list[ClientProcess] = []
    pub: WSClient | None = None
    tmp = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    try:
        ports = [s.port for s in servers]
        for k in range(client_procs):
            config = {
                "target": target.key,
                "ports": ports,
                "room": room,
                "indexes": list(range(k, subscribers, client_procs)),
                "messages": messages,
                "out": str(tmp / f"subscribers{k}.json"),
            }
            procs.append(await ClientProcess.start(config))
        for p in procs:
            await p.wait(p.ready, 120)
        # The publisher: its own socket on the first instance, in no room it publishes to.
        pub_rx = Receiver()

        def on_pub(client: WSClient, payload: bytes) -> None:
            if not target.control(client, payload):
                pub_rx.control.put_nowait(payload)

        pub = await target.open("127.0.0.1", servers[0].port, room, on_pub)
        await target.prepare_publisher(pub, pub_rx.control, room)
        await asyncio.sleep(1.0)

        expected = subscribers * messages
        profiler = Profiler(profile / target.name if profile else None)
        profiler.start(servers, messages / rate)
        for p in procs:
            p.tell(b"mark")
        await asyncio.sleep(0.05)
        cpu0 = target.cpu()
        client0 = time.process_time()
        t0 = time.perf_counter()
        for i in range(messages):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            text = f"bench:{i}:{time.perf_counter_ns()};"
            pub.send_text(target.publish_frame(room, text, i))
        publish_s = time.perf_counter() - t0
        # Drain: wait while deliveries still arrive (a loaded client lags, it does not
        # lose), give up after `idle` seconds without progress or `drain` in all.
        sent_at = last_progress = time.perf_counter()
        seen = -1
        while time.perf_counter() - sent_at < drain:
            got = sum(p.count for p in procs)
            if got >= expected:
                break
            if got != seen:
                seen, last_progress = got, time.perf_counter()
            elif time.perf_counter() - last_progress > idle:
                break
            await asyncio.sleep(0.05)
        wall = time.perf_counter() - t0
        cpu = target.cpu() - cpu0
        publisher_cpu = time.process_time() - client0
        for p in procs:
            p.tell(b"stop")
        for p in procs:
            await p.wait(p.done, 60)
        parts = [p.result() for p in procs]
        profiler.finish()
        delivered = sum(r["delivered"] for r in parts)
        latencies = [x for r in parts for x in r["latencies"]]
        sub_pct = [round(100 * r["cpu_s"] / r["wall_s"], 1) if r["wall_s"] else 0.0 for r in parts]
        publisher_pct = round(100 * publisher_cpu / wall, 1) if wall else 0.0
        return {
            "target": target.name,
            "persists": target.persists,
            "reference": target.reference,
            "instances": len(servers),
            "subscribers": subscribers,
            "messages": messages,
            "rate": rate,
            "load": load_name(subscribers, rate),
            "expected": expected,
            "delivered": delivered,
            "delivery_ratio": round(delivered / expected, 6) if expected else None,
            "complete_subscribers": sum(r["complete_subscribers"] for r in parts),
            "out_of_order": sum(r["out_of_order"] for r in parts),
            **summary_ms(latencies),
            "server_cpu_s": round(cpu, 3),
            # The client's own CPU, so a saturated client (whose lag is no server's)
            # shows: each subscriber process's share of a core, and the publisher's.
            "client_procs": client_procs,
            "client_cpu_s": round(publisher_cpu + sum(r["cpu_s"] for r in parts), 3),
            "subscriber_cpu_pct": sub_pct,
            "publisher_cpu_pct": publisher_pct,
            "client_cpu_pct_max": max([*sub_pct, publisher_pct]),
            "client_saturated": max([*sub_pct, publisher_pct]) >= SATURATED_PCT,
            "publish_s": round(publish_s, 3),
            "wall_s": round(wall, 3),
            "deliveries_per_cpu_s": round(delivered / cpu) if cpu > 0 else None,
        }
    finally:
        if pub is not None:
            pub.close()
        for p in procs:
            if not p.done.is_set() and p.proc.returncode is None:
                p.proc.kill()
            await p.close()
        await asyncio.sleep(0.2)
        await target.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# A client process using this much of a core over the run is saturated: its own
# lag would be counted as the servers'.
SATURATED_PCT = float(os.environ.get("BENCH_SATURATED_PCT", "90"))


def load_name(subscribers: int, rate: float) -> str:
    return f"{subscribers}x{rate:g}/s"


def parse_loads(text: str) -> list[tuple[int, float]]:
    """``200x50,400x100``: subscribers x messages per second, each a fan-out load."""
    loads = []
    for part in text.split(","):
        subscribers, _, rate = part.strip().partition("x")
        loads.append((int(subscribers), float(rate)))
    return loads
