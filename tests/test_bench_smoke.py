"""The bench tool runs end to end on tiny sizes and reports what it promises.

Speed is never asserted here (that is the bench's own job on a quiet
machine); only the report's structure and that every message was delivered,
in order, to every subscriber.
"""

from __future__ import annotations

import subprocess
import sys

import orjson

from tests import harness


def test_bench_all_scenarios_on_tiny_sizes(tmp_path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "all", "--targets", "gateway", "--json", str(out),
         "--instances", "2", "--subscribers", "6", "--messages", "30", "--rate", "60",
         "--connections", "40", "--idle-seconds", "1", "--post-conns", "2", "--rooms", "5",
         "--post-seconds", "1", "--reads", "20"],
        cwd=harness.ROOT, capture_output=True, text=True, timeout=harness.t(240))
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

    (posts,) = results["posts"]
    assert posts["posts"] > 0 and posts["errors"] == 0
    assert posts["server_cpu_ms_per_post"] > 0
    assert len(posts["per_instance"]) == 2 and all(n > 0 for n in posts["per_instance"])

    paths = [row["path"] for row in results["history"]]
    assert paths == ["http: warm cache", "http: postgres", "layer: warm cache",
                     "layer: postgres"]
    assert all(row["reads"] == 20 and row["p50_ms"] > 0 for row in results["history"])
    for scenario in results:
        assert f"== {scenario}" in proc.stdout
