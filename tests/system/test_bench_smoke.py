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
import pytest

from bench.procs import NODE_PEER
from tests import harness


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m bench ARGS`` from the repository, its output kept; it must succeed."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench", *args],
        cwd=harness.ROOT,
        capture_output=True,
        text=True,
        timeout=harness.t(240),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


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
            "--post-cost-rate",
            "40",
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
    # then messages to one room (of one subscriber here), each heard by all of it
    assert idle["room_subscribers"] == 1 and idle["room_delivered"] == idle["room_messages"]
    assert idle["client_procs"] == 1 and idle["room_p99_ms"] > 0
    assert idle["rss_after_kib"] > 0 and idle["open_files_limit"] > 0

    # the same 12 sockets in 3 rooms, then each in its own
    few, many = results["rooms"]
    assert (few["sockets"], few["rooms"], many["sockets"], many["rooms"]) == (12, 3, 12, 12)
    assert few["window_s"] >= 0.5 and many["idle_cpu_pct"] >= 0
    assert "cpu_vs_fewest" in many

    back_to_back, paced, alone, alone_paced = results["posts"]
    for posts in (back_to_back, paced, alone, alone_paced):
        assert posts["posts"] > 0 and posts["errors"] == 0
        assert posts["server_cpu_ms_per_post"] > 0
    # then one instance alone, with 16 connections, back to back and at 40/s
    assert (alone["instances"], alone["connections"]) == (1, 16)
    assert alone["offered_per_s_per_instance"] is None
    assert alone_paced["offered_per_s_per_instance"] == 40.0
    for posts in (back_to_back, paced):
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
    # one instance back to back names no size; CPU per post is judged at 1,000/s only
    assert met["posts: one instance back to back"] in {"yes", "no"}
    assert met["posts: one instance, 1000/s due: gateway CPU per post"] == "not measured"
    assert "== targets" in proc.stdout


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


def test_bench_search_on_a_tiny_table(tmp_path) -> None:
    out = tmp_path / "search.json"
    bench(
        "search",
        "--json",
        str(out),
        "--search-messages",
        "3000",
        "--search-rooms",
        "30",
        "--search-words",
        "200",
        "--search-queries",
        "5",
        "--search-posts",
        "100",
    )
    rows = orjson.loads(out.read_bytes())["results"]["search"]
    phases = [r["phase"] for r in rows]
    assert phases[0] == "bulk load" and rows[0]["messages"] == 3000
    assert phases[1] == "migration 0010_search+0010_search_index", phases
    assert rows[1]["posts_during"] >= 1  # writers kept posting while it ran
    searches = [(r["phase"], r["scope"]) for r in rows if r["phase"].startswith("search")]
    assert searches == [
        (f"search {kind}", scope)
        for kind in ("one-word", "two-word", "phrase", "prefix")
        for scope in ("all rooms", "10 rooms")
    ]
    for r in rows[2:10]:
        assert r["queries"] == 5 and r["p50_ms"] is not None and r["p99_ms"] >= r["p50_ms"]
    assert rows[2]["mean_hits"] > 0  # the one-word queries find what was loaded
    assert rows[-1]["phase"] == "posts/s" and rows[-1]["with_search"] > 0
    assert rows[-1]["without_search"] > 0
    # with and without search in turns, on the table and its copy without search
    assert [len(v) for v in rows[-1]["turns"].values()] == [3, 3]
    assert " vs " in rows[-1]["server_us_per_post"]


def test_bench_fanout_of_an_ephemeral_room(tmp_path) -> None:
    """``--kind ephemeral`` measures the gateway with its room in an ephemeral
    namespace: emits delivered to every subscriber, in order, nothing stored."""
    out = tmp_path / "ephemeral.json"
    bench(
        "fanout",
        "--kind",
        "ephemeral",
        "--targets",
        "gateway",
        "--instances",
        "2",
        "--loads",
        "5x40",
        "--messages",
        "20",
        "--json",
        str(out),
    )
    (fan,) = orjson.loads(out.read_bytes())["results"]["fanout"]
    assert fan["target"] == "gateway-ephemeral" and fan["persists"] is False
    assert fan["delivered"] == fan["expected"] == 5 * 20
    assert fan["complete_subscribers"] == 5 and fan["out_of_order"] == 0


def test_bench_reactions_on_a_tiny_room(tmp_path) -> None:
    """``reactions``: every reaction added or removed reaches every subscriber as a
    frame; the row carries the CPU and the change-log reads the instances count."""
    out = tmp_path / "reactions.json"
    proc = bench(
        "reactions",
        "--reaction-subscribers",
        "6",
        "--reaction-rate",
        "20",
        "--reaction-seconds",
        "1",
        "--json",
        str(out),
    )
    assert "== reactions" in proc.stdout
    (row,) = orjson.loads(out.read_bytes())["results"]["reactions"]
    assert row["instances"] == 2 and row["subscribers"] == 6
    assert row["reactions"] == 20 and row["changed"] == 20 and row["errors"] == 0
    assert row["frames"] == row["frames_due"] == 20 * 6 and row["delivery_ratio"] == 1.0
    assert row["server_cpu_ms_per_reaction"] > 0
    assert row["change_log_reads"] == sum(
        row[f"change_log_reads_{path}"] for path in ("fill", "change_fill", "catch_up")
    )


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_bench_state_on_a_tiny_room(tmp_path, transport: str) -> None:
    """``state``: once writes stop every subscriber, conflated or not, holds the
    store's values, and every dashboard connecting within the second gets its
    snapshot (the store read once per instance, the rest from memory; the
    database counted the transactions)."""
    out = tmp_path / "state.json"
    proc = bench(
        "state",
        "--state-transport",
        transport,
        "--state-keys",
        "40",
        "--state-rate",
        "200",
        "--state-seconds",
        "1",
        "--state-writers",
        "2",
        "--state-batch",
        "10",
        "--state-subscribers",
        "6",
        "--state-unconflated",
        "2",
        "--dashboards",
        "20",
        "--json",
        str(out),
    )
    assert "== state" in proc.stdout
    writes, dashboards = orjson.loads(out.read_bytes())["results"]["state"]
    assert writes["phase"] == "writes" and writes["subscribers"] == 6
    assert writes["transport"] == transport and writes["conflate_ms"] == 100
    assert writes["written"] == 200 and writes["errors"] == 0
    assert writes["connect_failed"] == writes["closed_subscribers"] == 0
    assert writes["older_frames"] == 0 and writes["mismatched"] == 0
    assert writes["frames_per_sub_unconflated"] == 200
    assert 0 < writes["frames_per_sub_conflated"] <= 200
    assert 0 <= writes["staleness_p50_ms"] <= writes["staleness_p99_ms"]
    assert writes["staleness_p99_ms"] <= writes["staleness_max_ms"]
    assert writes["server_cpu_us_per_write"] > 0 and writes["server_cpu_pct"] > 0
    assert writes["client_procs"] == 2 and len(writes["subscriber_cpu_pct"]) == 2
    assert dashboards["phase"] == "dashboards" and dashboards["dashboards"] == 20
    assert dashboards["connect_failed"] == 0
    assert dashboards["snapshots"] == dashboards["snapshots_equal_store"] == 20
    assert dashboards["snapshot_p50_ms"] <= dashboards["snapshot_max_ms"]
    # spread over the second: the last connects 0.95 s after the first
    assert dashboards["all_snapshots_ms"] >= 900
    assert dashboards["store_reads"] + dashboards["memory_hits"] == 20
    assert 1 <= dashboards["store_reads"] <= 2
    assert dashboards["postgres_transactions"] >= dashboards["store_reads"]
