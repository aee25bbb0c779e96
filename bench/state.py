"""State rooms: a busy room of keyed values, then a thousand dashboards at once.

Gateway instances on one Postgres database and Redis, one state room
(``kind = "state"``) of ``keys`` keys. Two rows:

``writes``: ``writers`` tasks in this process write ``rate`` keys per second in
total for ``seconds``, open loop, as ``PATCH /v1/rooms/{room}/state`` batches of
``batch`` keys (random keys, each batch's keys distinct), spread over the
instances. ``subscribers`` WebSocket subscribers, spread over the instances, follow
the room: ``unconflated`` of them with ``conflate_ms=0`` (every write), the rest
with ``conflate_ms`` (default 250). Each applies its snapshot then its frames.
Reported: the keys written per second achieved, the frames per subscriber of each
kind, the instances' CPU per key written, the time from the last write's answer
to each subscriber's last frame (p99/max), and, once writes stop and the
conflation intervals pass, the subscribers whose values differ from the store's
(``GET`` state): ``mismatched`` must be 0.

``dashboards``: the subscribers leave, then ``dashboards`` WebSocket subscribers
connect at once (spread over the instances) and subscribe without ``since``:
the time from each one's connect to its ``snapshot`` (p50/p99/max, and until all
have theirs), and the instances' ``chat_state_snapshots_total`` by source (a room
opened on an instance reads the store once; the subscribers after are served
from its memory).
"""

from __future__ import annotations

import asyncio
import random
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.procs import Server
from bench.targets import Gateway
from bench.wsclient import WSClient

ROOM = "dash:bench"
_SNAPSHOTS = re.compile(r'^chat_state_snapshots_total\{source="(\w+)"\} (\S+)$', re.M)


class Holder:
    """One subscriber: the values it holds after its snapshot and frames."""

    def __init__(self, conflate_ms: int) -> None:
        self.conflate_ms = conflate_ms
        self.values: dict[str, Any] = {}
        self.seqs: dict[str, int] = {}
        self.frames = 0
        self.older = 0  # a frame older than the key's last: must stay 0
        self.last_frame = 0.0
        self.snapshot_at: float | None = None
        self.closed = False

    def on_frame(self, _client: WSClient, data: bytes) -> None:
        if b'"type":"state"' in data:
            f = orjson.loads(data)
            key, seq = f["key"], f["seq"]
            if seq <= self.seqs.get(key, 0):
                self.older += 1
            self.seqs[key] = seq
            if f.get("deleted"):
                self.values.pop(key, None)
            else:
                self.values[key] = f["value"]
            self.frames += 1
            self.last_frame = time.perf_counter()
        elif b'"type":"snapshot"' in data:
            f = orjson.loads(data)
            self.values = {k: v["value"] for k, v in f["values"].items()}
            self.seqs = {k: v["seq"] for k, v in f["values"].items()}
            self.snapshot_at = time.perf_counter()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


async def _snapshots(http: httpx.AsyncClient, servers: list[Server]) -> dict[str, float]:
    out: dict[str, float] = {}
    for s in servers:
        text = (await http.get(f"http://127.0.0.1:{s.port}/metrics")).text
        for source, value in _SNAPSHOTS.findall(text):
            out[source] = out.get(source, 0.0) + float(value)
    return out


async def _subscribe(
    server: Server, holder: Holder, conflate_ms: int | None, timeout: float = 60
) -> WSClient:
    ws = await WSClient.connect("127.0.0.1", server.port, "/v1/ws", holder.on_frame, timeout)
    frame: dict[str, Any] = {"type": "subscribe", "room": ROOM}
    if conflate_ms is not None:
        frame["conflate_ms"] = conflate_ms
    ws.send_text(orjson.dumps(frame))
    return ws


async def run(
    *,
    instances: int = 2,
    keys: int = 1000,
    rate: float = 5000.0,
    seconds: float = 10.0,
    writers: int = 8,
    batch: int = 100,
    subscribers: int = 100,
    unconflated: int = 10,
    conflate_ms: int = 250,
    dashboards: int = 1000,
) -> list[dict[str, Any]]:
    target = Gateway()
    rng = random.Random(26)
    folder = Path(tempfile.mkdtemp(prefix="bench-state-"))
    namespaces = folder / "namespaces.toml"
    namespaces.write_text(
        '[namespaces.dash]\nkind = "state"\npresence = false\nrate_limit = "100000000/1s"\n'
    )
    names = [f"k{i:05d}" for i in range(keys)]
    try:
        servers = await target.start(instances, {"NAMESPACES_FILE": str(namespaces)})
        base = [f"http://127.0.0.1:{s.port}/v1/rooms/{ROOM}/state" for s in servers]
        async with httpx.AsyncClient(timeout=30) as http:
            for i in range(0, keys, 100):
                r = await http.patch(
                    base[0], json={"set": {k: {"v": 0} for k in names[i : i + 100]}}
                )
                r.raise_for_status()

            # -- writes: subscribers of both kinds, writers at the rate ----------
            holders = [Holder(0 if k < unconflated else conflate_ms) for k in range(subscribers)]
            clients = [
                await _subscribe(servers[k % instances], h, h.conflate_ms)
                for k, h in enumerate(holders)
            ]
            deadline = time.monotonic() + 60
            while any(h.snapshot_at is None for h in holders) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for ws, h in zip(clients, holders, strict=True):
                ws.closed.add_done_callback(lambda _f, h=h: setattr(h, "closed", True))

            cpu0 = target.cpu()
            client0 = time.process_time()
            written = 0
            errors = 0
            batches = max(1, round(rate * seconds / batch))
            per_writer = [list(range(w, batches, writers)) for w in range(writers)]
            interval = batch / rate  # seconds between batches, over all writers
            start = time.perf_counter()
            counter = 0

            async def writer(w: int) -> None:
                nonlocal written, errors, counter
                url = base[w % instances]
                for n in per_writer[w]:
                    await asyncio.sleep(max(0.0, start + n * interval - time.perf_counter()))
                    counter += 1
                    body = {"set": {k: {"v": counter, "w": w} for k in rng.sample(names, batch)}}
                    r = await http.patch(url, json=body)
                    if r.status_code == 200:
                        written += batch
                    else:
                        errors += 1

            await asyncio.gather(*(writer(w) for w in range(min(writers, batches))))
            end = time.perf_counter()
            window = end - start
            # quiet: a conflated subscriber's last frame leaves conflate_ms after
            # the last write; wait until every subscriber holds the store's values
            store = (await http.get(base[0])).json()
            want = {k: v["value"] for k, v in store["values"].items()}
            settle = time.monotonic() + 30
            while time.monotonic() < settle and any(
                h.values != want for h in holders if not h.closed
            ):
                await asyncio.sleep(0.1)
            await asyncio.sleep(max(0.5, 2 * conflate_ms / 1000))
            cpu = target.cpu() - cpu0
            client_cpu = time.process_time() - client0
            store = (await http.get(base[-1])).json()
            want = {k: v["value"] for k, v in store["values"].items()}
            alive = [h for h in holders if not h.closed]
            mismatched = sum(h.values != want for h in alive)
            lags = [max(0.0, h.last_frame - end) * 1000 for h in alive if h.last_frame]
            kinds: dict[str, list[int]] = {}
            for h in alive:
                kinds.setdefault("conflated" if h.conflate_ms else "unconflated", []).append(
                    h.frames
                )
            writes_row: dict[str, Any] = {
                "phase": "writes",
                "instances": instances,
                "keys": keys,
                "offered_per_s": rate,
                "writers": writers,
                "batch": batch,
                "subscribers": subscribers,
                "unconflated": unconflated,
                "conflate_ms": conflate_ms,
                "written": written,
                "errors": errors,
                "writes_per_s": round(written / max(window, seconds), 1),
                **{
                    f"frames_per_sub_{kind}": round(statistics.mean(v), 1)
                    for kind, v in sorted(kinds.items())
                },
                "frames": sum(h.frames for h in alive),
                "older_frames": sum(h.older for h in alive),
                "closed_subscribers": subscribers - len(alive),
                "mismatched": mismatched,
                "last_frame_p99_ms": _pct(lags, 0.99),
                "last_frame_max_ms": _pct(lags, 1.0),
                "server_cpu_s": round(cpu, 2),
                "server_cpu_us_per_write": round(cpu / written * 1e6, 1) if written else None,
                # this process (writers and subscribers): near 1 s a second, it held the run back
                "client_cpu_s": round(client_cpu, 2),
            }
            for ws in clients:
                if ws.transport is not None:
                    ws.transport.close()
            await asyncio.sleep(1.0)  # the instances close the room: the next opens it

            # -- dashboards: all at once ------------------------------------------
            before = await _snapshots(http, servers)
            dash = [Holder(0) for _ in range(dashboards)]
            began = time.perf_counter()
            results = await asyncio.gather(
                *(_subscribe(servers[k % instances], h, None) for k, h in enumerate(dash)),
                return_exceptions=True,
            )
            sockets = [ws for ws in results if isinstance(ws, WSClient)]
            deadline = time.monotonic() + 60
            while any(h.snapshot_at is None for h in dash) and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            waits = [(h.snapshot_at - began) * 1000 for h in dash if h.snapshot_at is not None]
            after = await _snapshots(http, servers)
            complete = sum(h.values == want for h in dash)
            for ws in sockets:
                if ws.transport is not None:
                    ws.transport.close()

        def delta(source: str) -> int:
            return round(after.get(source, 0.0) - before.get(source, 0.0))

        dash_row: dict[str, Any] = {
            "phase": "dashboards",
            "instances": instances,
            "keys": keys,
            "dashboards": dashboards,
            "connect_failed": dashboards - len(sockets),
            "snapshots": len(waits),
            "snapshots_equal_store": complete,
            "snapshot_p50_ms": _pct(waits, 0.5),
            "snapshot_p99_ms": _pct(waits, 0.99),
            "snapshot_max_ms": _pct(waits, 1.0),
            "store_reads": delta("store"),
            "memory_hits": delta("memory"),
        }
        return [writes_row, dash_row]
    finally:
        await target.stop()
