"""The bench tool runs end to end on tiny sizes and reports what it promises.

Speed is never asserted here (that is the bench's own job on a quiet
machine); only the report's structure and that every message was delivered,
in order, to every subscriber.
"""

from __future__ import annotations

import subprocess
import sys

import orjson

from bench.__main__ import median_rows
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
            "gateway",
            "--json",
            str(out),
            "--instances",
            "2",
            "--subscribers",
            "6",
            "--messages",
            "30",
            "--rate",
            "60",
            "--connections",
            "40",
            "--idle-seconds",
            "1",
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
    assert set(results) == {"fanout", "idle", "posts", "history"}

    (fan,) = results["fanout"]
    assert fan["target"] == "gateway" and fan["persists"] is True
    assert fan["expected"] == 6 * 30
    assert fan["delivered"] == fan["expected"] and fan["delivery_ratio"] == 1.0
    assert fan["complete_subscribers"] == 6 and fan["out_of_order"] == 0
    assert fan["p50_ms"] is not None and fan["p99_ms"] >= fan["p50_ms"]
    assert fan["server_cpu_s"] >= 0

    (idle,) = results["idle"]
    assert idle["connections"] == 40 and idle["failed"] == 0
    assert idle["rss_after_kib"] > 0 and idle["open_files_limit"] > 0

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
    assert met["fan-out: deliveries per server CPU-second vs best peer"] == "not measured"
    assert met["idle: KiB per connection at 10,000"] == "not measured"
    assert "== targets" in proc.stdout


def _fan(target: str, per_cpu: int, p99: float, **size: object) -> dict[str, object]:
    return {
        "target": target,
        "persists": target == "gateway",
        "instances": 2,
        "subscribers": 400,
        "rate": 100.0,
        "deliveries_per_cpu_s": per_cpu,
        "p99_ms": p99,
        "delivery_ratio": 1.0,
        **size,
    }


def test_targets_are_judged_against_the_best_peer_and_the_named_sizes() -> None:
    results = {
        "fanout": [
            _fan("gateway", 70_000, 90.0),
            _fan("broadcaster", 32_000, 100.0),
            _fan("python-socketio", 13_000, 50.0),
        ],
        "idle": [{"target": "gateway", "connections": 10_000, "rss_per_conn_kib": 21.0}],
        "posts": [{"instances": 2, "posts_per_s_per_instance": 2100, "p99_ms": 24.0}],
        "history": [{"path": "layer: warm cache", "speedup_p50": 9.9}],
    }
    met = {row["target"]: (row["met"], row["measured"]) for row in verdicts(results)}
    # the best peer is the one with the most deliveries per CPU-second
    assert met["fan-out: deliveries per server CPU-second vs best peer"] == (
        "yes",
        "2.19x (broadcaster)",
    )
    assert met["fan-out: p99 vs best peer"][0] == "yes"  # 90 <= broadcaster's 100
    assert met["idle: KiB per connection at 10,000"][0] == "no"
    assert met["posts: per instance back to back, p99 (2 instances)"][0] == "yes"
    assert met["history: warm cache vs Postgres, p50 (storage layer)"][0] == "no"
    results["fanout"][0]["subscribers"] = 40
    met = {row["target"]: row["met"] for row in verdicts(results)}
    assert met["fan-out: deliveries per server CPU-second vs best peer"] == "not measured"


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
