"""``python -m bench SCENARIO [options]``: run, print a table, write JSON.

Scenarios: ``fanout`` (gateway beside the peers), ``idle``, ``posts``,
``history``, or ``all`` (those four); ``webhooks`` on its own. Every run stops by itself; servers listen on loopback.
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

from bench import fanout, history, idle, posts, webhooks
from bench.procs import raise_open_files
from bench.targets import TARGETS
from bench.verdict import POSTS_PER_INSTANCE, verdicts

SCENARIOS = ("fanout", "idle", "posts", "history")


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
        "target",
        "persists",
        "instances",
        "subscribers",
        "messages",
        "delivery_ratio",
        "out_of_order",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "server_cpu_s",
        "client_cpu_s",
        "deliveries_per_cpu_s",
    ],
    "idle": ["target", "connections", "rss_per_conn_kib", "idle_cpu_pct", "open_files_limit"],
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
    scenarios = SCENARIOS if args.scenario == "all" else (args.scenario,)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    for name in targets:
        if name not in TARGETS:
            sys.exit(f"bench: unknown target {name!r}; choose from {', '.join(TARGETS)}")
    for scenario in scenarios:
        runs = [await run_scenario(scenario, args, targets) for _ in range(args.repeat)]
        rows = median_rows(runs)
        if args.repeat > 1:
            report.setdefault("runs", {})[scenario] = runs
        report["results"][scenario] = rows
        title = f" (median of {args.repeat} runs)" if args.repeat > 1 else ""
        print(f"\n== {scenario}{title}", flush=True)
        print(table(rows, COLUMNS[scenario]), flush=True)
        if scenario in MORE_COLUMNS:
            print(table(rows, MORE_COLUMNS[scenario]), flush=True)
    report["targets"] = verdicts(report["results"])
    print("\n== targets", flush=True)
    print(table(report["targets"], ["target", "measured", "bound", "met"]), flush=True)
    return report


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
        for name in targets:
            rows.append(
                await fanout.run(
                    TARGETS[name](),
                    instances=args.instances,
                    subscribers=args.subscribers,
                    messages=args.messages,
                    rate=args.rate,
                    profile=args.profile,
                )
            )
    elif scenario == "idle":
        for name in targets if args.idle_peers else ["gateway"]:
            rows.append(
                await idle.run(
                    TARGETS[name](),
                    connections=args.connections,
                    settle=args.idle_seconds,
                    rooms=args.idle_rooms,
                )
            )
    elif scenario == "posts":
        # back to back first (the most the machine gives), then at the target's rate
        for rate in [None, *([args.post_rate] if args.post_rate else [])]:
            rows.append(
                await posts.run(
                    instances=args.instances,
                    connections=args.post_conns,
                    rooms=args.rooms,
                    seconds=args.post_seconds,
                    rate=rate,
                    profile=args.profile,
                )
            )
    elif scenario == "history":
        rows.extend(await history.run(reads=args.reads))
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


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("scenario", choices=(*SCENARIOS, "webhooks", "all"))
    p.add_argument(
        "--targets",
        default="gateway,socketio,broadcaster",
        help="fan-out targets, comma-separated (default: all three)",
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
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--subscribers", type=int, default=400)
    p.add_argument("--messages", type=int, default=1000)
    p.add_argument("--rate", type=float, default=100.0, help="messages per second")
    p.add_argument("--connections", type=int, default=10000, help="idle WebSocket connections")
    p.add_argument(
        "--idle-seconds", type=float, default=10.0, help="idle window over which CPU is measured"
    )
    p.add_argument(
        "--idle-rooms",
        type=int,
        default=idle.ROOMS,
        help="idle: rooms the connections are spread over (0: a room per connection)",
    )
    p.add_argument("--idle-peers", action="store_true", help="measure the peers idle too")
    p.add_argument("--post-conns", type=int, default=32, help="HTTP connections per instance")
    p.add_argument("--rooms", type=int, default=200)
    p.add_argument("--post-seconds", type=float, default=10.0)
    p.add_argument(
        "--post-rate",
        type=float,
        default=float(POSTS_PER_INSTANCE),
        help="posts/s due per instance in a second, open-loop run (0: none); "
        "the first run always posts back to back",
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
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each scenario this many times and report each figure's median "
        "(the runs themselves go to the JSON): a shared machine's figures "
        "move from run to run",
    )
    return p.parse_args(argv)


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
