"""The targets the gateway is held to, checked against a report's results.

Each row names a target, the figure measured, the ratio or bound it is held
to, and whether this run met it. A target whose scenario did not run, or ran
at another size than the target names, is reported as not measured: the
figures of a smaller run say nothing about the target.
"""

from __future__ import annotations

from typing import Any

FANOUT_RATIO = 2.0  # deliveries per server CPU-second, against the best peer
FANOUT_SIZE = {"instances": 2, "subscribers": 400, "rate": 100.0}  # at least
IDLE_KIB = 20.0  # resident KiB per idle WebSocket connection
IDLE_CONNECTIONS = 10_000
POSTS_PER_INSTANCE = 2000
POSTS_P99_MS = 25.0
KEPT_UP = 0.99  # of the posts due at a rate, answered within the run
HISTORY_SPEEDUP = 10.0  # warm cache vs Postgres, p50, storage layer


def _row(target: str, measured: str, bound: str, met: bool | None) -> dict[str, Any]:
    return {
        "target": target,
        "measured": measured,
        "bound": bound,
        "met": "not measured" if met is None else ("yes" if met else "no"),
    }


def _cores(post: dict[str, Any]) -> str:
    """The cores the target's rate would take at the run's CPU per post, all processes."""
    need = post.get("cores_for_target")
    return "" if need is None else f" (the target's rate takes {need} cores)"


def _posts_row(post: dict[str, Any] | None) -> dict[str, Any]:
    """Back to back (no rate): the most posts/s per instance, with the p99 of a
    saturated machine. At a rate: whether the instances kept up with posts due at
    the target's rate (KEPT_UP of them answered within the run), and the p99."""
    bound = f">= {POSTS_PER_INSTANCE}/s, < {POSTS_P99_MS} ms"
    if post is None:
        return _row("posts: per instance, p99", "-", bound, None)
    offered = post.get("offered_per_s_per_instance")
    where = f" ({post['instances']} instances)"
    fast = post["p99_ms"] is not None and post["p99_ms"] < POSTS_P99_MS
    measured = f"{post['posts_per_s_per_instance']}/s, {post['p99_ms']} ms" + _cores(post)
    if offered is None:
        return _row(
            "posts: per instance back to back, p99" + where,
            measured,
            bound,
            post["posts_per_s_per_instance"] >= POSTS_PER_INSTANCE and fast,
        )
    return _row(
        f"posts: {offered:g}/s due per instance, p99" + where,
        measured,
        bound,
        offered >= POSTS_PER_INSTANCE
        and fast
        and post["posts_per_s_per_instance"] >= KEPT_UP * offered,
    )


def verdicts(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    fan = results.get("fanout") or []
    gateway = next((r for r in fan if r["target"] == "gateway"), None)
    peers = [r for r in fan if r["target"] != "gateway" and r.get("deliveries_per_cpu_s")]
    if gateway is None or not peers or any(gateway[k] < v for k, v in FANOUT_SIZE.items()):
        rows.append(
            _row(
                "fan-out: deliveries per server CPU-second vs best peer",
                "-",
                f">= {FANOUT_RATIO}x",
                None,
            )
        )
    else:
        best = max(peers, key=lambda r: r["deliveries_per_cpu_s"])
        ratio = gateway["deliveries_per_cpu_s"] / best["deliveries_per_cpu_s"]
        rows.append(
            _row(
                "fan-out: deliveries per server CPU-second vs best peer",
                f"{ratio:.2f}x ({best['target']})",
                f">= {FANOUT_RATIO}x",
                ratio >= FANOUT_RATIO and gateway["persists"],
            )
        )
        rows.append(
            _row(
                "fan-out: p99 vs best peer",
                f"{gateway['p99_ms']} ms vs {best['p99_ms']} ms",
                "no worse",
                gateway["p99_ms"] is not None
                and best["p99_ms"] is not None
                and gateway["p99_ms"] <= best["p99_ms"],
            )
        )
        rows.append(
            _row(
                "fan-out: every message delivered",
                str(gateway["delivery_ratio"]),
                "1.0",
                gateway["delivery_ratio"] == 1.0,
            )
        )
    idle = next((r for r in results.get("idle") or [] if r["target"] == "gateway"), None)
    rows.append(
        _row(
            f"idle: KiB per connection at {IDLE_CONNECTIONS:,}",
            "-" if idle is None else f"{idle['rss_per_conn_kib']} KiB",
            f"< {IDLE_KIB} KiB",
            None
            if idle is None or idle["connections"] < IDLE_CONNECTIONS
            else idle["rss_per_conn_kib"] < IDLE_KIB,
        )
    )
    for post in results.get("posts") or [None]:
        rows.append(_posts_row(post))
    layer = next(
        (r for r in results.get("history") or [] if r["path"] == "layer: warm cache"), None
    )
    rows.append(
        _row(
            "history: warm cache vs Postgres, p50 (storage layer)",
            "-" if layer is None else f"{layer.get('speedup_p50')}x",
            f">= {HISTORY_SPEEDUP}x",
            None
            if layer is None or layer.get("speedup_p50") is None
            else layer["speedup_p50"] >= HISTORY_SPEEDUP,
        )
    )
    return rows
