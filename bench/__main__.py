"""``python -m bench SCENARIO [options]``: run, print a table, write JSON.

Scenarios: ``fanout`` (gateway beside the peers, at each load), ``idle``,
``rooms``, ``posts``, ``history``, or ``all`` (those five); ``webhooks``,
``search``, ``sql`` (a backend's COMMIT to a subscriber), ``reactions`` (a room of
200 subscribers and 50 reactions/s), ``state`` (a state room of 1,000 keys written
5,000 times a second under 1,000 SSE subscribers, then 1,000 dashboards
connecting within a second) and ``delay`` (the gateway's fan-out at one load
for each ``WS_WRITE_DELAY`` of ``--delays``) on their own. Every run stops by itself;
servers listen on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from bench import (
    fanout,
    history,
    idle,
    otlp_sink,
    posts,
    reactions,
    rooms,
    search,
    sql_publish,
    state,
    webhooks,
)
from bench.procs import raise_open_files
from bench.targets import TARGETS, Gateway
from bench.verdict import POST_COST_CONNS, POST_COST_RATE, POSTS_PER_INSTANCE, verdicts

SCENARIOS = ("fanout", "idle", "rooms", "posts", "history")


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), ""
            )
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_avg": os.getloadavg(),
    }


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(out)


COLUMNS = {
    "fanout": [
        "load",
        "target",
        "persists",
        "instances",
        "messages",
        "delivery_ratio",
        "out_of_order",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "server_cpu_s",
        "deliveries_per_cpu_s",
        "client_procs",
        "client_cpu_s",
        "client_cpu_pct_max",
    ],
    "idle": [
        "target",
        "connections",
        "failed",
        "rooms",
        "client_procs",
        "connect_s",
        "accepts_per_s",
        "rss_per_conn_kib",
        "connections_per_gib",
        "idle_cpu_pct",
        "room_subscribers",
        "last_receive_ms",
        "room_p99_ms",
        "deliveries_per_core_s",
        "open_files_limit",
    ],
    "delay": [
        "ws_write_delay",
        "load",
        "target",
        "messages",
        "delivery_ratio",
        "p50_ms",
        "p99_ms",
        "server_cpu_s",
        "deliveries_per_cpu_s",
    ],
    "rooms": [
        "target",
        "instances",
        "sockets",
        "rooms",
        "window_s",
        "server_cpu_s",
        "idle_cpu_pct",
        "cpu_vs_fewest",
    ],
    "posts": [
        "target",
        "instances",
        "connections",
        "rooms",
        "offered_per_s_per_instance",
        "posts",
        "errors",
        "posts_per_s",
        "posts_per_s_per_instance",
        "p50_ms",
        "p99_ms",
        "server_cpu_s",
        "server_cpu_ms_per_post",
        "client_cpu_s",
    ],
    "history": ["path", "reads", "p50_ms", "p99_ms", "max_ms", "speedup_p50"],
    "search": [
        "phase",
        "scope",
        "messages",
        "seconds",
        "queries",
        "mean_hits",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "posts_during",
        "post_max_ms",
        "with_search",
        "without_search",
        "cost_pct",
        "server_us_per_post",
    ],
    "webhooks": [
        "phase",
        "rooms",
        "events",
        "offered_per_s",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "concurrency",
        "events_per_s",
        "server_cpu_ms_per_event",
        "seconds",
        "attempts",
        "first_2s",
        "attempts_per_min",
    ],
    "sql": ["posts", "pace_ms", "p50_ms", "p99_ms", "max_ms"],
    "reactions": [
        "instances",
        "subscribers",
        "offered_per_s",
        "changed",
        "errors",
        "reactions_per_s",
        "frames",
        "frames_due",
        "delivery_ratio",
        "server_cpu_ms_per_reaction",
        "server_cpu_us_per_frame",
        "change_log_reads",
        "gap_fills",
    ],
    "state": [
        "phase",
        "transport",
        "instances",
        "keys",
        "subscribers",
        "offered_per_s",
        "writes_per_s",
        "errors",
        "frames_per_sub_unconflated",
        "frames_per_sub_conflated",
        "conflate_ms",
        "older_frames",
        "closed_subscribers",
        "mismatched",
        "staleness_p50_ms",
        "staleness_p99_ms",
        "staleness_max_ms",
        "server_cpu_s",
        "server_cpu_us_per_write",
        "server_cpu_pct",
        "writer_cpu_pct",
        "subscriber_cpu_pct_max",
    ],
}
# A scenario whose rows are of two phases: each phase's rows in a table of its own.
PHASE_COLUMNS = {
    "state": {
        "dashboards": [
            "phase",
            "transport",
            "instances",
            "keys",
            "dashboards",
            "connect_s",
            "connect_failed",
            "snapshots",
            "snapshot_p50_ms",
            "snapshot_p99_ms",
            "snapshot_max_ms",
            "all_snapshots_ms",
            "store_reads",
            "memory_hits",
            "postgres_transactions",
            "postgres_window_s",
        ],
    },
}
# A second table for a scenario: what each post cost every process on the machine.
MORE_COLUMNS = {
    "posts": [
        "target",
        "server_cpu_ms_per_post",
        "postgres_cpu_ms_per_post",
        "redis_cpu_ms_per_post",
        "client_cpu_ms_per_post",
        "machine_cpu_ms_per_post",
        "cores_for_target",
        "steal_pct",
    ],
}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    nofile = raise_open_files()
    report: dict[str, Any] = {
        "machine": machine(),
        "open_files_limit": nofile,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": {},
    }
    if args.tracing:
        with otlp_sink.sink() as spans:
            Gateway.tracing_env = spans.env()
            report["tracing"] = True
            try:
                return await _main(args, report)
            finally:
                report["otlp_requests"] = spans.requests
                report["otlp_bytes"] = spans.bytes
                Gateway.tracing_env = {}
    return await _main(args, report)


async def _main(args: argparse.Namespace, report: dict[str, Any]) -> dict[str, Any]:
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.kind == "ephemeral":
        targets = ["gateway-ephemeral" if t == "gateway" else t for t in targets]
    targets = list(dict.fromkeys(targets))
    for name in targets:
        if name not in TARGETS:
            sys.exit(f"bench: unknown target {name!r}; choose from {', '.join(TARGETS)}")
    for scenario in scenarios:
        # the machine's load around each scenario: its latencies move with it
        load = {"start": os.getloadavg()}
        runs = [await run_scenario(scenario, args, targets) for _ in range(args.repeat)]
        load["end"] = os.getloadavg()
        report.setdefault("load_avg", {})[scenario] = load
        rows = median_rows(runs)
        if args.repeat > 1:
            report.setdefault("runs", {})[scenario] = runs
        report["results"][scenario] = rows
        title = f" (median of {args.repeat} runs)" if args.repeat > 1 else ""
        print(f"\n== {scenario}{title}", flush=True)
        print(f"load average {fmt_load(load['start'])} before, {fmt_load(load['end'])} after")
        phases = PHASE_COLUMNS.get(scenario, {})
        first = [r for r in rows if r.get("phase") not in phases]
        print(table(first, COLUMNS[scenario]), flush=True)
        for phase, columns in phases.items():
            print(table([r for r in rows if r.get("phase") == phase], columns), flush=True)
        if scenario in MORE_COLUMNS:
            print(table(rows, MORE_COLUMNS[scenario]), flush=True)
    report["targets"] = verdicts(report["results"])
    print("\n== targets", flush=True)
    print(table(report["targets"], ["target", "measured", "bound", "met"]), flush=True)
    return report


def fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def median_rows(runs: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """The rows of the first run with each number replaced by its median over
    the runs (row by row: the same scenario gives the same rows in the same
    order). Each figure is its own median, so a row's figures may come from
    different runs."""
    rows = []
    for i, first in enumerate(runs[0]):
        row = dict(first)
        for key, value in first.items():
            values = [run[i].get(key) for run in runs]
            if (
                isinstance(value, (int, float))
                and not isinstance(value, bool)
                and all(isinstance(v, (int, float)) for v in values)
            ):
                mid = statistics.median(values)
                row[key] = round(mid, 3) if isinstance(mid, float) else mid
        rows.append(row)
    return rows


async def run_scenario(
    scenario: str, args: argparse.Namespace, targets: list[str]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if scenario == "fanout":
        for subscribers, rate in fanout.parse_loads(args.loads):
            for name in targets:
                rows.append(await fanout_row(name, args, subscribers, rate))
    elif scenario == "idle":
        names = (
            [n for n in targets if not TARGETS[n].reference and n != "gateway-ephemeral"]
            if args.idle_peers
            else ["gateway"]
        )
        for spec in args.idle_rooms.split(","):
            for name in names:
                rows.append(
                    await idle.run(
                        TARGETS[name](),
                        connections=args.connections,
                        settle=args.idle_seconds,
                        rooms=0 if spec.strip() == "each" else int(spec),
                        messages=args.idle_messages,
                    )
                )
    elif scenario == "rooms":
        rows.extend(
            await rooms.run(
                instances=args.instances,
                many=args.many_rooms,
                few=args.few_rooms,
                window=args.rooms_seconds,
            )
        )
    elif scenario == "posts":
        # back to back first (the most the machine gives), then at the target's rate;
        # then one instance alone, back to back and paced at --post-cost-rate: what
        # a post costs the instance that takes it
        runs = [(args.instances, args.post_conns, None)]
        if args.post_rate:
            runs.append((args.instances, args.post_conns, args.post_rate))
        if args.post_cost_rate:
            runs.append((1, POST_COST_CONNS, None))
            runs.append((1, POST_COST_CONNS, args.post_cost_rate))
        for instances, connections, rate in runs:
            rows.append(
                await posts.run(
                    instances=instances,
                    connections=connections,
                    rooms=args.rooms,
                    seconds=args.post_seconds,
                    rate=rate,
                    profile=args.profile,
                )
            )
    elif scenario == "delay":
        # the adaptive write hold's place on the latency / efficiency curve
        for subscribers, rate in fanout.parse_loads(args.loads):
            for value in args.delays.split(","):
                row = await fanout.run(
                    TARGETS["gateway"](),
                    instances=args.instances,
                    subscribers=subscribers,
                    messages=args.messages,
                    rate=rate,
                    client_procs=1 if args.client_procs == "auto" else int(args.client_procs),
                    env={"WS_WRITE_DELAY": value.strip()},
                )
                rows.append({"ws_write_delay": value.strip(), **row})
    elif scenario == "history":
        rows.extend(await history.run(reads=args.reads))
    elif scenario == "search":
        rows.extend(
            await search.run(
                messages=args.search_messages,
                rooms=args.search_rooms,
                words_count=args.search_words,
                queries_each=args.search_queries,
                posts=args.search_posts,
            )
        )
    elif scenario == "sql":
        rows.extend(await sql_publish.run(posts=args.sql_posts))
    elif scenario == "reactions":
        rows.extend(
            await reactions.run(
                instances=args.instances,
                subscribers=args.reaction_subscribers,
                rate=args.reaction_rate,
                seconds=args.reaction_seconds,
            )
        )
    elif scenario == "state":
        rows.extend(
            await state.run(
                instances=args.instances,
                keys=args.state_keys,
                rate=args.state_rate,
                seconds=args.state_seconds,
                writers=args.state_writers,
                batch=args.state_batch,
                subscribers=args.state_subscribers,
                unconflated=args.state_unconflated,
                conflate_ms=args.state_conflate_ms,
                dashboards=args.dashboards,
                transport=args.state_transport,
                client_procs=2 if args.client_procs == "auto" else int(args.client_procs),
            )
        )
    elif scenario == "webhooks":
        rows.extend(
            await webhooks.run(
                rooms=args.hook_rooms,
                rate=args.hook_rate,
                seconds=args.hook_seconds,
                backlog=args.hook_backlog,
                dead_seconds=args.dead_seconds,
                concurrency=args.hook_concurrency,
            )
        )
    return rows


async def fanout_row(
    name: str, args: argparse.Namespace, subscribers: int, rate: float
) -> dict[str, Any]:
    """One target at one load. With ``--client-procs auto`` the subscribers start
    in one client process; if it saturates, the run is made again with them
    spread over two (the saturated run's figures stay in the row)."""

    async def once(procs: int) -> dict[str, Any]:
        return await fanout.run(
            TARGETS[name](),
            instances=args.instances,
            subscribers=subscribers,
            messages=args.messages,
            rate=rate,
            client_procs=procs,
            profile=args.profile,
        )

    if args.client_procs != "auto":
        return await once(int(args.client_procs))
    row = await once(1)
    if not row["client_saturated"]:
        return row
    print(
        f"bench: {row['target']} at {row['load']}: the client process saturated "
        f"({row['client_cpu_pct_max']} % of a core); again with two",
        file=sys.stderr,
        flush=True,
    )
    again = await once(2)
    again["saturated_one_process"] = {
        k: row[k] for k in ("p50_ms", "p99_ms", "deliveries_per_cpu_s", "client_cpu_pct_max")
    }
    return again


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "scenario",
        choices=(*SCENARIOS, "webhooks", "search", "sql", "reactions", "state", "delay", "all"),
    )
    p.add_argument(
        "--targets",
        default="gateway,gateway-ephemeral,node-socketio,socketio,broadcaster,redis",
        help="fan-out targets, comma-separated (default: all; gateway-ephemeral is the "
        "gateway with its room in an ephemeral namespace; redis is Redis itself "
        "as a fan-out server, a reference row)",
    )
    p.add_argument(
        "--json",
        type=Path,
        default=Path("bench-results.json"),
        help="where to write the JSON report",
    )
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="record py-spy profiles of the servers into this directory",
    )
    p.add_argument(
        "--kind",
        choices=("stored", "ephemeral"),
        default="stored",
        help="fan-out: the gateway's room kind; ephemeral runs the gateway target with "
        "its room in an ephemeral namespace (emit frames, nothing stored), as "
        "gateway-ephemeral",
    )
    p.add_argument("--instances", type=int, default=2)
    p.add_argument(
        "--tracing",
        action="store_true",
        help="run the gateways with tracing on (every trace sampled), exporting over "
        "OTLP/HTTP to a sink in this process: compare with the same run without it",
    )
    p.add_argument(
        "--loads",
        default="200x50,400x100",
        help="fan-out loads, comma-separated: subscribers x messages per second",
    )
    p.add_argument(
        "--subscribers",
        type=int,
        default=None,
        help="fan-out: one load of this many subscribers (with --rate; instead of --loads)",
    )
    p.add_argument(
        "--rate",
        type=float,
        default=None,
        help="fan-out: one load at this many messages per second (instead of --loads)",
    )
    p.add_argument("--messages", type=int, default=1000, help="fan-out: messages per load")
    p.add_argument(
        "--client-procs",
        default="auto",
        help="fan-out, state: processes the subscribers are spread over; auto: one, and two "
        "again if it saturates (state: auto is two)",
    )
    p.add_argument("--connections", type=int, default=10000, help="idle WebSocket connections")
    p.add_argument(
        "--idle-seconds", type=float, default=10.0, help="idle window over which CPU is measured"
    )
    p.add_argument("--idle-peers", action="store_true", help="measure the peers idle too")
    p.add_argument(
        "--idle-messages",
        type=int,
        default=5,
        help="idle: messages then sent to one room, each once every subscriber has the last",
    )
    p.add_argument(
        "--delays",
        default="0,0.002,0.005,0.01,0.02,0.05",
        help="delay: the WS_WRITE_DELAY values, comma-separated (with --loads, "
        "default here 200x50)",
    )
    p.add_argument(
        "--idle-rooms",
        default="each,100",
        help="idle: the rooms the connections are in, comma-separated runs: "
        "'each' (a room per connection) or a number of shared rooms",
    )
    p.add_argument(
        "--many-rooms", type=int, default=3000, help="rooms: sockets, each in its own room"
    )
    p.add_argument(
        "--few-rooms", type=int, default=30, help="rooms: the shared rooms of the same sockets"
    )
    p.add_argument(
        "--rooms-seconds", type=float, default=20.0, help="rooms: idle window of each measure"
    )
    p.add_argument("--post-conns", type=int, default=32, help="HTTP connections per instance")
    p.add_argument("--rooms", type=int, default=200)
    p.add_argument(
        "--post-cost-rate",
        type=float,
        default=float(POST_COST_RATE),
        help=f"posts: then one instance with {POST_COST_CONNS} connections, back to back and "
        "paced at this rate (0: not run): CPU per post and posts/s of one instance",
    )
    p.add_argument("--post-seconds", type=float, default=10.0)
    p.add_argument(
        "--post-rate",
        type=float,
        default=float(POSTS_PER_INSTANCE),
        help="posts/s due per instance in a second, open-loop run (0: none); "
        "the first run always posts back to back",
    )
    p.add_argument("--sql-posts", type=int, default=300, help="sql: posts committed by the backend")
    p.add_argument(
        "--reaction-subscribers", type=int, default=200, help="reactions: the room's subscribers"
    )
    p.add_argument(
        "--reaction-rate", type=float, default=50.0, help="reactions: added or removed per second"
    )
    p.add_argument(
        "--reaction-seconds", type=float, default=10.0, help="reactions: length of the run"
    )
    p.add_argument("--state-keys", type=int, default=1000, help="state: the room's keys")
    p.add_argument(
        "--state-rate", type=float, default=5000.0, help="state: keys written per second in all"
    )
    p.add_argument("--state-seconds", type=float, default=10.0, help="state: length of the writes")
    p.add_argument("--state-writers", type=int, default=8, help="state: writer tasks (HTTP PATCH)")
    p.add_argument("--state-batch", type=int, default=100, help="state: keys per PATCH (1..100)")
    p.add_argument(
        "--state-transport",
        choices=("sse", "ws"),
        default="sse",
        help="state: how subscribers and dashboards connect",
    )
    p.add_argument(
        "--state-subscribers", type=int, default=1000, help="state: subscribers of the writes"
    )
    p.add_argument(
        "--state-unconflated",
        type=int,
        default=0,
        help="state: of those, how many take every write (conflate_ms=0)",
    )
    p.add_argument(
        "--state-conflate-ms",
        type=int,
        default=100,
        help="state: conflate_ms of the other subscribers",
    )
    p.add_argument(
        "--dashboards",
        type=int,
        default=1000,
        help="state: subscribers connecting within a second",
    )
    p.add_argument("--hook-rooms", type=int, default=50, help="webhooks: rooms (queues)")
    p.add_argument(
        "--hook-rate", type=float, default=25.0, help="webhooks: posts/s in the latency phase"
    )
    p.add_argument(
        "--hook-seconds", type=float, default=8.0, help="webhooks: length of the latency phase"
    )
    p.add_argument(
        "--hook-backlog",
        type=int,
        default=5000,
        help="webhooks: events drained in the throughput phase",
    )
    p.add_argument(
        "--hook-concurrency",
        type=int,
        default=16,
        help="webhooks: WEBHOOK_CONCURRENCY of the draining instance",
    )
    p.add_argument(
        "--dead-seconds",
        type=float,
        default=60.0,
        help="webhooks: window over which attempts to a dead receiver are counted",
    )
    p.add_argument("--reads", type=int, default=2000, help="history reads per path")
    p.add_argument("--search-messages", type=int, default=1_000_000, help="search: messages loaded")
    p.add_argument("--search-rooms", type=int, default=1000, help="search: rooms they are in")
    p.add_argument("--search-words", type=int, default=5000, help="search: words they use")
    p.add_argument(
        "--search-queries", type=int, default=200, help="search: queries of each kind per scope"
    )
    p.add_argument(
        "--search-posts", type=int, default=4000, help="search: posts per posts/s measure"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each scenario this many times and report each figure's median "
        "(the runs themselves go to the JSON): a shared machine's figures "
        "move from run to run",
    )
    args = p.parse_args(argv)
    if args.scenario == "delay" and "--loads" not in (argv if argv is not None else sys.argv):
        args.loads = "200x50"
    if args.subscribers is not None or args.rate is not None:
        args.loads = f"{args.subscribers or 400}x{args.rate or 100.0:g}"
    return args


def run(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        report = asyncio.run(main(args))
    else:
        report = uvloop.run(main(args))
    args.json.write_bytes(orjson.dumps(report, option=orjson.OPT_INDENT_2))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run())
