"""State rooms: a busy room of keyed values, then a thousand dashboards connecting.

Gateway instances on one Postgres database and Redis, one state room
(``kind = "state"``) of ``keys`` keys (1,000). The subscribers live in
``client_procs`` processes of their own (:mod:`bench.state_subscribers`), over
``transport``: SSE (``GET /v1/rooms/{room}/events``, the default, as a dashboard
is) or WebSocket. Two rows:

``writes``: ``writers`` tasks in this process write ``rate`` keys per second in
total (5,000) for ``seconds``, open loop, as ``PATCH /v1/rooms/{room}/state``
batches of ``batch`` keys (random keys, each batch's keys distinct), spread over
the instances. ``subscribers`` (1,000), spread over the instances, follow the
room: ``unconflated`` of them (0) with ``conflate_ms=0`` (every write), the rest
with ``conflate_ms`` (100). Each applies its snapshot then its frames. Reported:
the keys written per second achieved, the frames per subscriber of each kind,
the frames older than a key's last (must be 0), the instances' CPU (per key
written and in all), staleness: the time from the last write's answer to each
subscriber's last frame, the one that gave it the store's final values (p50,
p99, max over subscribers), and ``mismatched``: once the conflation intervals
passed and each subscriber process read all it was sent (none of its
subscribers got a frame for twice ``conflate_ms``), the subscribers whose values
differ from the store's (``GET`` state, compared by digest): must be 0. The CPU share of the writers and of each
subscriber process says whether the client kept up: a subscriber process near
100 % read its frames late, and the staleness it saw is partly its own.

``dashboards``: the subscribers leave, then ``dashboards`` (1,000) connect
spread evenly over ``connect_s`` (1 s) and subscribe without ``since``: the time
from each one's own connect to its ``snapshot`` (p50/p99/max), the time from
the first connect to the last snapshot, the instances'
``chat_state_snapshots_total`` by source (a room opened on an instance reads
the store once; the subscribers after are served from its memory), and the
database's own count of the transactions in the bench's database
(``pg_stat_database``, read before and after through its own connection):
``postgres_transactions``. PostgreSQL reports a backend's counts up to 10 s
late, so each read waits ``PG_STATS_SETTLE`` after the work before it; the count
thus covers ``postgres_window_s`` and includes whatever else the instances did
in that window (their periodic checks, the room's closing), not only snapshots.
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

import asyncpg
import httpx

from bench.fanout import ClientProcess
from bench.procs import Server
from bench.state_subscribers import digest
from bench.targets import Gateway

ROOM = "dash:bench"
# A backend's counters reach pg_stat_database when it next reports them: at the
# latest 10 s after its last transaction (PGSTAT_IDLE_INTERVAL, PostgreSQL 15+).
PG_STATS_SETTLE = 11.0
# What one reading of the count adds to the next: its connection's start and its query.
PG_READ_TRANSACTIONS = 2
_SNAPSHOTS = re.compile(r'^chat_state_snapshots_total\{source="(\w+)"\} (\S+)$', re.M)


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


async def _pg_transactions(url: str) -> int:
    """The database's own count of its committed and rolled back transactions."""
    conn = await asyncpg.connect(url, timeout=10)
    try:
        value: int = await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database"
            " WHERE datname = current_database()"
        )
    finally:
        await conn.close()
    return value


async def _spread(
    servers: list[Server],
    folder: Path,
    name: str,
    *,
    transport: str,
    conflate: list[int | None],
    client_procs: int,
    spread_s: float,
    quiet_s: float = 0.0,
) -> list[ClientProcess]:
    """``len(conflate)`` subscribers in ``client_procs`` processes of their own
    (:mod:`bench.state_subscribers`), subscriber ``i`` opened ``spread_s * i / n``
    after the start; returns once all hold their snapshot."""
    total = len(conflate)
    procs = []
    for k in range(min(client_procs, total)):
        indexes = list(range(k, total, client_procs))
        config = {
            "transport": transport,
            "ports": [s.port for s in servers],
            "room": ROOM,
            "indexes": indexes,
            "conflate": [conflate[i] for i in indexes],
            "total": total,
            "spread_s": spread_s,
            "quiet_s": quiet_s,
            "out": str(folder / f"{name}{k}.json"),
        }
        procs.append(await ClientProcess.start(config, "bench.state_subscribers"))
    for p in procs:
        await p.wait(p.up, 60)
    start = time.perf_counter() + 0.2
    for p in procs:
        p.tell(f"connect {start!r}".encode())
    for p in procs:
        await p.wait(p.ready, 120)
    return procs


async def _results(procs: list[ClientProcess]) -> list[dict[str, Any]]:
    """Each process's result (after ``stop``), the processes ended."""
    for p in procs:
        p.tell(b"stop")
    for p in procs:
        await p.wait(p.done, 60)
    parts = [p.result() for p in procs]
    for p in procs:
        await p.close()
    return parts


async def run(
    *,
    instances: int = 2,
    keys: int = 1000,
    rate: float = 5000.0,
    seconds: float = 10.0,
    writers: int = 8,
    batch: int = 100,
    subscribers: int = 1000,
    unconflated: int = 0,
    conflate_ms: int = 100,
    dashboards: int = 1000,
    transport: str = "sse",
    client_procs: int = 2,
    connect_s: float = 1.0,
) -> list[dict[str, Any]]:
    target = Gateway()
    rng = random.Random(26)
    folder = Path(tempfile.mkdtemp(prefix="bench-state-"))
    namespaces = folder / "namespaces.toml"
    namespaces.write_text(
        '[namespaces.dash]\nkind = "state"\npresence = false\nrate_limit = "100000000/1s"\n'
    )
    names = [f"k{i:05d}" for i in range(keys)]
    procs: list[ClientProcess] = []
    try:
        servers = await target.start(instances, {"NAMESPACES_FILE": str(namespaces)})
        assert target.database_url is not None
        base = [f"http://127.0.0.1:{s.port}/v1/rooms/{ROOM}/state" for s in servers]
        async with httpx.AsyncClient(timeout=30) as http:
            for i in range(0, keys, 100):
                r = await http.patch(
                    base[0], json={"set": {k: {"v": 0} for k in names[i : i + 100]}}
                )
                r.raise_for_status()

            # -- writes: subscribers of both kinds, writers at the rate ----------
            conflate: list[int | None] = [
                0 if k < unconflated else conflate_ms for k in range(subscribers)
            ]
            procs = await _spread(
                servers,
                folder,
                "writes",
                transport=transport,
                conflate=conflate,
                client_procs=client_procs,
                spread_s=0.0,
                quiet_s=max(0.5, 2 * conflate_ms / 1000),
            )
            for p in procs:
                p.tell(b"mark")
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
            # quiet: a conflated subscriber's last frame leaves conflate_ms after the
            # last write; a loaded client may still be reading what came before
            await asyncio.sleep(max(1.0, 3 * conflate_ms / 1000))
            cpu = target.cpu() - cpu0
            client_cpu = time.process_time() - client0
            measured = time.perf_counter() - start  # the writes and the quiet after
            parts = await _results(procs)
            procs = []
            store = (await http.get(base[-1])).json()
            want = digest({k: v["value"] for k, v in store["values"].items()})
            subs = [s for part in parts for s in part["subscribers"]]
            alive = [s for s in subs if not s["closed"]]
            mismatched = sum(s["digest"] != want for s in alive)
            stale = [max(0.0, s["last_frame"] - end) * 1000 for s in alive if s["last_frame"]]
            kinds: dict[str, list[int]] = {}
            for s in alive:
                kinds.setdefault("conflated" if s["conflate_ms"] else "unconflated", []).append(
                    s["frames"]
                )
            sub_pct = [
                round(100 * part["cpu_s"] / part["wall_s"], 1) if part["wall_s"] else 0.0
                for part in parts
            ]
            writes_row: dict[str, Any] = {
                "phase": "writes",
                "transport": transport,
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
                "frames": sum(s["frames"] for s in alive),
                "older_frames": sum(s["older"] for s in alive),
                "connect_failed": sum(part["connect_failed"] for part in parts),
                "closed_subscribers": subscribers - len(alive),
                "mismatched": mismatched,
                "staleness_p50_ms": _pct(stale, 0.5),
                "staleness_p99_ms": _pct(stale, 0.99),
                "staleness_max_ms": _pct(stale, 1.0),
                "server_cpu_s": round(cpu, 2),
                "server_cpu_us_per_write": round(cpu / written * 1e6, 1) if written else None,
                # percent of one core, over the writes and the quiet after, the
                # instances summed
                "server_cpu_pct": round(100 * cpu / measured, 1),
                # the writers (this process): near 100 % it held the rate back
                "writer_cpu_pct": round(100 * client_cpu / measured, 1),
                # each subscriber process: near 100 % it read late, and staleness is its own
                "client_procs": len(parts),
                "subscriber_cpu_pct": sub_pct,
                "subscriber_cpu_pct_max": max(sub_pct, default=0.0),
            }
            # the instances close the room (the next subscriber opens it again), and
            # the writes' transactions reach the database's statistics
            await asyncio.sleep(PG_STATS_SETTLE)

            # -- dashboards: connecting within connect_s -------------------------
            before = await _snapshots(http, servers)
            transactions0 = await _pg_transactions(target.database_url)
            counted_from = time.perf_counter()
            procs = await _spread(
                servers,
                folder,
                "dashboards",
                transport=transport,
                conflate=[None] * dashboards,
                client_procs=client_procs,
                spread_s=connect_s,
            )
            all_in = time.perf_counter()
            after = await _snapshots(http, servers)
            await asyncio.sleep(PG_STATS_SETTLE)
            transactions = (
                await _pg_transactions(target.database_url) - transactions0 - PG_READ_TRANSACTIONS
            )
            counted_s = time.perf_counter() - counted_from
            parts = await _results(procs)
            procs = []
            dash = [s for part in parts for s in part["subscribers"]]
            got = [s for s in dash if s["snapshot_at"] is not None]
            waits = [(s["snapshot_at"] - s["connect_at"]) * 1000 for s in got]
            first = min((s["connect_at"] for s in dash if s["connect_at"]), default=all_in)
            last = max((s["snapshot_at"] for s in got), default=all_in)
            complete = sum(s["digest"] == want for s in got)

        def delta(source: str) -> int:
            return round(after.get(source, 0.0) - before.get(source, 0.0))

        dash_row: dict[str, Any] = {
            "phase": "dashboards",
            "transport": transport,
            "instances": instances,
            "keys": keys,
            "dashboards": dashboards,
            "connect_s": connect_s,
            "connect_failed": sum(part["connect_failed"] for part in parts),
            "snapshots": len(got),
            "snapshots_equal_store": complete,
            "snapshot_p50_ms": _pct(waits, 0.5),
            "snapshot_p99_ms": _pct(waits, 0.99),
            "snapshot_max_ms": _pct(waits, 1.0),
            # from the first dashboard's connect to the last one's snapshot
            "all_snapshots_ms": round((last - first) * 1000, 1),
            "store_reads": delta("store"),
            "memory_hits": delta("memory"),
            "postgres_transactions": transactions,
            # the window postgres_transactions were counted in
            "postgres_window_s": round(counted_s, 1),
        }
        return [writes_row, dash_row]
    finally:
        for p in procs:
            if p.proc.returncode is None:
                p.proc.kill()
            await p.close()
        await target.stop()
