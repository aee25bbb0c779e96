"""The bench tool runs end to end on tiny sizes and reports what it promises.

Speed is never asserted here (that is the bench's own job on a quiet
machine); only the report's structure and that every message was delivered,
in order, to every subscriber.
"""

from __future__ import annotations

import os
import subprocess
import sys

import orjson

from bench.__main__ import median_rows, parse
from bench.fanout import parse_loads
from bench.procs import NODE_PEER
from bench.verdict import verdicts
from tests import harness


def test_bench_all_scenarios_on_tiny_sizes(tmp_path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "all",
            "--targets",
            "gateway,redis",
            "--json",
            str(out),
            "--instances",
            "2",
            "--loads",
            "6x60",
            "--messages",
            "30",
            "--client-procs",
            "2",
            "--connections",
            "40",
            "--idle-rooms",
            "each",
            "--idle-seconds",
            "1",
            "--many-rooms",
            "12",
            "--few-rooms",
            "3",
            "--rooms-seconds",
            "0.5",
            "--post-conns",
            "2",
            "--rooms",
            "5",
            "--post-seconds",
            "1",
            "--post-rate",
            "50",
            "--reads",
            "20",
        ],
        cwd=harness.ROOT,
        capture_output=True,
        text=True,
        timeout=harness.t(240),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = orjson.loads(out.read_bytes())
    assert report["machine"]["cpus"] >= 1
    results = report["results"]
    assert set(results) == {"fanout", "idle", "rooms", "posts", "history"}

    # the gateway, and Redis itself as a fan-out server beside it
    fans = results["fanout"]
    assert [(f["load"], f["target"]) for f in fans] == [("6x60/s", "gateway"), ("6x60/s", "redis")]
    for fan in fans:
        subscribers = fan["subscribers"]
        assert fan["expected"] == subscribers * 30
        assert fan["delivered"] == fan["expected"] and fan["delivery_ratio"] == 1.0
        assert fan["complete_subscribers"] == subscribers and fan["out_of_order"] == 0
        assert fan["p50_ms"] is not None and fan["p99_ms"] >= fan["p50_ms"]
        assert fan["server_cpu_s"] >= 0
        # the subscribers in two client processes, each one's share of a core reported
        assert fan["client_procs"] == 2 and len(fan["subscriber_cpu_pct"]) == 2
        assert fan["client_cpu_s"] > 0 and fan["client_cpu_pct_max"] > 0
    gateway, redis = fans
    assert gateway["persists"] is True and gateway["instances"] == 2
    assert redis["reference"] is True and redis["instances"] == 1

    (idle,) = results["idle"]  # each connection in a room of its own
    assert idle["connections"] == 40 and idle["rooms"] == 40 and idle["failed"] == 0
    assert idle["rss_after_kib"] > 0 and idle["open_files_limit"] > 0

    # the same 12 sockets in 3 rooms, then each in its own
    few, many = results["rooms"]
    assert (few["sockets"], few["rooms"], many["sockets"], many["rooms"]) == (12, 3, 12, 12)
    assert few["window_s"] >= 0.5 and many["idle_cpu_pct"] >= 0
    assert "cpu_vs_fewest" in many

    back_to_back, paced = results["posts"]
    for posts in (back_to_back, paced):
        assert posts["posts"] > 0 and posts["errors"] == 0
        assert posts["server_cpu_ms_per_post"] > 0
        assert len(posts["per_instance"]) == 2 and all(n > 0 for n in posts["per_instance"])
        # what the posts cost the machine's other processes, and the cores at the target
        assert posts["postgres_cpu_ms_per_post"] > 0 and posts["redis_cpu_ms_per_post"] > 0
        assert posts["machine_cpu_ms_per_post"] > posts["server_cpu_ms_per_post"]
        assert posts["cores_for_target"] > 0 and 0 <= posts["steal_pct"] <= 100
    assert back_to_back["offered_per_s_per_instance"] is None
    # paced: the posts due at 50/s in the measured second, each sent and answered
    # 201 (errors is 0 above); one the loaded client sent after the second ended
    # is answered but not counted in the second
    assert paced["offered_per_s_per_instance"] == 50.0
    assert paced["due_per_instance"] == [50, 50] and paced["unsent_per_instance"] == [0, 0]
    answered = zip(paced["per_instance"], paced["late_per_instance"], strict=True)
    assert [n + late for n, late in answered] == [50, 50]

    paths = [row["path"] for row in results["history"]]
    assert paths == ["http: warm cache", "http: postgres", "layer: warm cache", "layer: postgres"]
    assert all(row["reads"] == 20 and row["p50_ms"] > 0 for row in results["history"])
    for scenario in results:
        assert f"== {scenario}" in proc.stdout
    # tiny sizes: the targets are printed but none is judged on them, except
    # posts and history, whose targets do not name a size
    met = {row["target"]: row["met"] for row in report["targets"]}
    assert met["fan-out 400x100/s: deliveries per server CPU-second vs best peer"] == (
        "not measured"
    )
    assert met["idle: KiB per connection at 10,000, a room each"] == "not measured"
    assert met["rooms: idle CPU, 3,000 rooms vs 30 (same sockets)"] == "not measured"
    assert "== targets" in proc.stdout


def _fan(
    target: str, per_cpu: int, p50: float, p99: float, load: tuple[int, float] = (400, 100.0)
) -> dict[str, object]:
    return {
        "target": target,
        "persists": target == "gateway",
        "reference": target == "redis",
        "instances": 1 if target == "redis" else 2,
        "subscribers": load[0],
        "rate": load[1],
        "deliveries_per_cpu_s": per_cpu,
        "p50_ms": p50,
        "p99_ms": p99,
        "delivery_ratio": 1.0,
        "out_of_order": 0,
    }


def test_targets_are_judged_against_the_best_peer_and_the_named_sizes() -> None:
    small = (200, 50.0)
    results = {
        "fanout": [
            _fan("gateway", 60_000, 4.0, 9.0, small),
            _fan("node-socketio", 31_000, 3.0, 12.0, small),
            _fan("python-socketio", 9_000, 5.0, 8.0, small),
            _fan("redis", 500_000, 0.3, 1.0, small),
            _fan("gateway", 70_000, 5.0, 40.0),
            _fan("node-socketio", 34_000, 6.0, 45.0),
            _fan("broadcaster", 32_000, 7.0, 100.0),
            _fan("redis", 68_000, 0.4, 2.0),
        ],
        "idle": [
            {"target": "gateway", "connections": 10_000, "rooms": 100, "rss_per_conn_kib": 15.0},
            {"target": "gateway", "connections": 10_000, "rooms": 10_000, "rss_per_conn_kib": 16.5},
        ],
        "rooms": [
            {"target": "gateway", "sockets": 3000, "rooms": 30, "idle_cpu_pct": 2.0},
            {"target": "gateway", "sockets": 3000, "rooms": 3000, "idle_cpu_pct": 2.9},
        ],
        "posts": [{"instances": 2, "posts_per_s_per_instance": 2100, "p99_ms": 24.0}],
        "history": [{"path": "layer: warm cache", "speedup_p50": 9.9}],
    }
    met = {row["target"]: (row["met"], row["measured"]) for row in verdicts(results)}
    # each figure against the best peer at its load (Redis, a reference, is no peer)
    assert met["fan-out 200x50/s: p50 vs best peer"] == ("no", "4.0 ms vs 3.0 ms (node-socketio)")
    assert met["fan-out 200x50/s: p99 vs best peer"] == (
        "no",
        "9.0 ms vs 8.0 ms (python-socketio)",
    )
    assert met["fan-out 200x50/s: deliveries per server CPU-second vs best peer"] == (
        "no",
        "1.94x (node-socketio)",
    )
    assert met["fan-out 400x100/s: p50 vs best peer"][0] == "yes"
    assert met["fan-out 400x100/s: p99 vs best peer"][0] == "yes"
    assert met["fan-out 400x100/s: deliveries per server CPU-second vs best peer"] == (
        "yes",
        "2.06x (node-socketio)",
    )
    assert met["fan-out 400x100/s: deliveries per server CPU-second vs Redis itself"] == (
        "yes",
        "70000 vs 68000 (1.03x)",
    )
    assert met["fan-out 400x100/s: every message delivered, in order"][0] == "yes"
    # the shared-rooms row is not the one judged
    assert met["idle: KiB per connection at 10,000, a room each"] == ("no", "16.5 KiB")
    assert met["rooms: idle CPU, 3,000 rooms vs 30 (same sockets)"] == (
        "yes",
        "2.9 % vs 2.0 % of a core (1.45x)",
    )
    assert met["posts: per instance back to back, p99 (2 instances)"][0] == "yes"
    assert met["history: warm cache vs Postgres, p50 (storage layer)"][0] == "no"

    # a gateway that loses or reorders a message fails, whatever its speed
    results["fanout"][4]["out_of_order"] = 1
    met = {row["target"]: (row["met"], row["measured"]) for row in verdicts(results)}
    assert met["fan-out 400x100/s: every message delivered, in order"][0] == "no"
    # without Node Socket.IO in the run, or at other sizes, nothing is judged
    del results["fanout"][5]
    results["fanout"][0]["subscribers"] = 40
    results["rooms"][1]["sockets"] = 300
    met = {row["target"]: (row["met"], row["measured"]) for row in verdicts(results)}
    for load in ("200x50/s", "400x100/s"):
        assert met[f"fan-out {load}: p99 vs best peer"][0] == "not measured"
        assert met[f"fan-out {load}: deliveries per server CPU-second vs best peer"][0] == (
            "not measured"
        )
    assert met["rooms: idle CPU, 3,000 rooms vs 30 (same sockets)"][0] == "not measured"
    results["fanout"][0]["subscribers"] = 200
    results["fanout"].append(_fan("node-socketio", 10_000, 9.0, 90.0))
    met = {row["target"]: (row["met"], row["measured"]) for row in verdicts(results)}
    assert met["fan-out 400x100/s: p99 vs best peer"] == (
        "yes",
        "40.0 ms vs 90.0 ms (node-socketio)",
    )


def test_paced_posts_are_judged_on_keeping_up_at_the_targets_rate() -> None:
    def met(**post: object) -> str:
        row = {
            "instances": 1,
            "offered_per_s_per_instance": 2000.0,
            "posts_per_s_per_instance": 2000,
            "p99_ms": 20.0,
            **post,
        }
        (verdict,) = [r for r in verdicts({"posts": [row]}) if r["target"].startswith("posts")]
        assert verdict["target"] == (
            f"posts: {row['offered_per_s_per_instance']:g}/s due per instance, p99 (1 instances)"
        )
        return str(verdict["met"])

    assert met() == "yes"
    assert met(p99_ms=30.0) == "no"
    assert met(posts_per_s_per_instance=1900) == "no", "fell behind the posts due"
    assert met(offered_per_s_per_instance=1500.0, posts_per_s_per_instance=1500) == "no"


def test_fanout_loads_and_the_single_load_options() -> None:
    assert parse_loads("200x50, 400x100") == [(200, 50.0), (400, 100.0)]
    assert parse(["fanout"]).loads == "200x50,400x100"
    assert parse(["fanout", "--subscribers", "2", "--rate", "100"]).loads == "2x100"
    assert parse(["fanout", "--rate", "50"]).loads == "400x50"
    assert parse(["idle"]).idle_rooms == "each,100"


def test_repeated_runs_report_each_figures_median() -> None:
    runs = [
        [
            {"path": "warm", "p50_ms": 0.05, "reads": 10, "speedup_p50": 9.1},
            {"path": "pg", "p50_ms": 0.6, "reads": 10, "speedup_p50": None},
        ],
        [
            {"path": "warm", "p50_ms": 0.07, "reads": 10, "speedup_p50": 10.6},
            {"path": "pg", "p50_ms": 0.5, "reads": 10, "speedup_p50": None},
        ],
        [
            {"path": "warm", "p50_ms": 0.06, "reads": 10, "speedup_p50": 10.2},
            {"path": "pg", "p50_ms": 0.55, "reads": 10, "speedup_p50": None},
        ],
    ]
    assert median_rows(runs) == [
        {"path": "warm", "p50_ms": 0.06, "reads": 10, "speedup_p50": 10.2},
        {"path": "pg", "p50_ms": 0.55, "reads": 10, "speedup_p50": None},
    ]
    assert median_rows(runs[:1]) == runs[0]


def test_node_socketio_peer_runs_from_its_locked_packages(tmp_path) -> None:
    """The Node Socket.IO peer for real, with a handful of subscribers: its packages
    installed from the committed lock into its own folder (once; kept out of the
    repository), two instances over one Redis, driven by the same raw client."""
    out = tmp_path / "node.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "fanout",
            "--targets",
            "node-socketio",
            "--json",
            str(out),
            "--loads",
            "5x40",
            "--messages",
            "20",
        ],
        cwd=harness.ROOT,
        capture_output=True,
        text=True,
        timeout=harness.t(300),
        # every client process counts as saturated: the run is made again with the
        # subscribers spread over two processes
        env={**os.environ, "BENCH_SATURATED_PCT": "0"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (fan,) = orjson.loads(out.read_bytes())["results"]["fanout"]
    assert "the client process saturated" in proc.stderr
    assert fan["client_procs"] == 2 and len(fan["subscriber_cpu_pct"]) == 2
    assert fan["saturated_one_process"]["p99_ms"] is not None
    assert fan["target"] == "node-socketio" and fan["instances"] == 2
    assert fan["persists"] is False and fan["reference"] is False
    assert fan["delivered"] == fan["expected"] == 5 * 20
    assert fan["complete_subscribers"] == 5 and fan["out_of_order"] == 0
    assert fan["server_cpu_s"] > 0 and fan["p99_ms"] >= fan["p50_ms"] > 0
    folder = NODE_PEER
    lock = orjson.loads((folder / "package-lock.json").read_bytes())
    for name, version in (("socket.io", "4.8."), ("@socket.io/redis-adapter", "8.3.")):
        assert lock["packages"][f"node_modules/{name}"]["version"].startswith(version)
        assert (folder / "node_modules" / name / "package.json").exists()
    ignored = (harness.ROOT / ".gitignore").read_text().split()
    assert "bench/peers/node_socketio/node_modules/" in ignored
