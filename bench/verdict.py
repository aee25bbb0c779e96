"""The targets the gateway is held to, checked against a report's results.

Each row names a target, the figure measured, the ratio or bound it is held
to, and whether this run met it. A target whose scenario did not run, or ran
at another size than the target names, is reported as not measured: the
figures of a smaller run say nothing about the target.
"""

from __future__ import annotations

from typing import Any

FANOUT_RATIO = 2.0  # deliveries per server CPU-second, against the best peer
FANOUT_INSTANCES = 2  # at least
# subscribers x messages/s; at each, p50 and p99 no worse than the best peer's
FANOUT_LOADS = ((200, 50.0), (400, 100.0))
# at this load, deliveries per server CPU-second at least Redis' own as a fan-out server
FANOUT_REDIS_LOAD = (400, 100.0)
NODE = "node-socketio"  # the peer a run must include for its fan-out to be judged
IDLE_KIB = 16.0  # resident KiB per idle WebSocket connection, each in a room of its own
IDLE_CONNECTIONS = 10_000
ROOMS_MANY, ROOMS_FEW = 3000, 30
ROOMS_CPU_RATIO = 1.5  # idle CPU with ROOMS_MANY rooms over that with ROOMS_FEW, same sockets
POSTS_PER_INSTANCE = 2000
# Against Socket.IO on Node at each load, the same run: (p50 at most this many times
# Node's, p99 at most this many times, deliveries per server CPU-second at least this
# many times Node's). Stored rooms commit every message first; ephemeral rooms do
# what Node does. A load absent here is not judged for that kind.
VERSUS_NODE = {
    "gateway": {(200, 50.0): (1.5, 1.0, 1.25), (400, 100.0): (None, None, 1.5)},
    "gateway-ephemeral": {(200, 50.0): (1.0, 1.0, 2.0), (400, 100.0): (1.0, 1.0, 2.0)},
}
# One instance alone (POST_COST_CONNS connections): posts/s back to back, and its CPU
# per post with posts due at POST_COST_RATE a second.
POST_COST_CONNS = 16
POST_COST_RATE = 1000
POSTS_ALONE = 3000
POST_CPU_MS = 0.2
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


def _at(rows: list[dict[str, Any]], subscribers: int, rate: float) -> list[dict[str, Any]]:
    return [r for r in rows if r["subscribers"] == subscribers and r["rate"] == rate]


def _client_note(*rows: dict[str, Any]) -> str:
    """A saturated client lags on its own: its latencies are not only the server's."""
    busy = [r["target"] for r in rows if r.get("client_saturated")]
    return f" (client saturated: {', '.join(busy)})" if busy else ""


def _fanout_rows(fan: list[dict[str, Any]], subscribers: int, rate: float) -> list[dict[str, Any]]:
    load = f"{subscribers}x{rate:g}/s"
    rows_at = _at(fan, subscribers, rate)
    gateway = next((r for r in rows_at if r["target"] == "gateway"), None)
    peers = [
        r
        for r in rows_at
        if r["target"] not in VERSUS_NODE  # the gateway's own kinds are no peers
        and not r.get("reference")
        and r.get("deliveries_per_cpu_s")
        and r.get("p99_ms") is not None
    ]
    redis = next((r for r in rows_at if r["target"] == "redis"), None)
    names = {
        "p50": f"fan-out {load}: p50 vs best peer",
        "p99": f"fan-out {load}: p99 vs best peer",
        "cpu": f"fan-out {load}: deliveries per server CPU-second vs best peer",
        "redis": f"fan-out {load}: deliveries per server CPU-second vs Redis itself",
        "all": f"fan-out {load}: every message delivered, in order",
    }
    wants_redis = (subscribers, rate) == FANOUT_REDIS_LOAD
    judged = (
        gateway is not None
        and gateway["instances"] >= FANOUT_INSTANCES
        and any(r["target"] == NODE for r in peers)
    )
    if not judged:
        out = [
            _row(names["p50"], "-", f"<= best peer's (with {NODE})", None),
            _row(names["p99"], "-", f"<= best peer's (with {NODE})", None),
            _row(names["cpu"], "-", f">= {FANOUT_RATIO}x", None),
        ]
        if wants_redis:
            out.append(_row(names["redis"], "-", ">= 1.0x", None))
        out.append(_row(names["all"], "-", "1.0", None))
        return out
    assert gateway is not None
    out = []
    for q in ("p50", "p99"):
        best = min(peers, key=lambda r: r[f"{q}_ms"])
        mine = gateway[f"{q}_ms"]
        out.append(
            _row(
                names[q],
                f"{mine} ms vs {best[f'{q}_ms']} ms ({best['target']})"
                + _client_note(gateway, best),
                "no worse",
                mine is not None and mine <= best[f"{q}_ms"],
            )
        )
    best = max(peers, key=lambda r: r["deliveries_per_cpu_s"])
    ratio = gateway["deliveries_per_cpu_s"] / best["deliveries_per_cpu_s"]
    out.append(
        _row(
            names["cpu"],
            f"{ratio:.2f}x ({best['target']})",
            f">= {FANOUT_RATIO}x",
            ratio >= FANOUT_RATIO and gateway["persists"],
        )
    )
    if wants_redis:
        if redis is None or not redis.get("deliveries_per_cpu_s"):
            out.append(_row(names["redis"], "-", ">= 1.0x", None))
        else:
            versus = gateway["deliveries_per_cpu_s"] / redis["deliveries_per_cpu_s"]
            out.append(
                _row(
                    names["redis"],
                    f"{gateway['deliveries_per_cpu_s']} vs {redis['deliveries_per_cpu_s']}"
                    f" ({versus:.2f}x)",
                    ">= 1.0x",
                    versus >= 1.0,
                )
            )
    out.append(
        _row(
            names["all"],
            f"{gateway['delivery_ratio']}, {gateway['out_of_order']} out of order",
            "1.0, 0",
            gateway["delivery_ratio"] == 1.0 and gateway["out_of_order"] == 0,
        )
    )
    return out


def _versus_node(fan: list[dict[str, Any]], subscribers: int, rate: float) -> list[dict[str, Any]]:
    """Each gateway kind against Socket.IO on Node at one load (VERSUS_NODE)."""
    load = f"{subscribers}x{rate:g}/s"
    rows_at = _at(fan, subscribers, rate)
    node = next((r for r in rows_at if r["target"] == NODE and r.get("p99_ms") is not None), None)
    out = []
    for kind, loads in VERSUS_NODE.items():
        bounds = loads.get((subscribers, rate))
        if bounds is None:
            continue
        mine = next((r for r in rows_at if r["target"] == kind), None)
        judged = mine is not None and node is not None and mine["delivery_ratio"] == 1.0
        for q, bound in zip(("p50", "p99"), bounds[:2], strict=True):
            if bound is None:
                continue
            name = f"fan-out {load}, {kind}: {q} vs {NODE}"
            if not judged:
                out.append(_row(name, "-", f"<= {bound:g}x", None))
                continue
            assert mine is not None and node is not None
            ratio = mine[f"{q}_ms"] / node[f"{q}_ms"]
            out.append(
                _row(
                    name,
                    f"{mine[f'{q}_ms']} vs {node[f'{q}_ms']} ms ({ratio:.2f}x)"
                    + _client_note(mine, node),
                    f"<= {bound:g}x",
                    ratio <= bound,
                )
            )
        name = f"fan-out {load}, {kind}: deliveries per server CPU-second vs {NODE}"
        if not judged:
            out.append(_row(name, "-", f">= {bounds[2]:g}x", None))
            continue
        assert mine is not None and node is not None
        ratio = mine["deliveries_per_cpu_s"] / node["deliveries_per_cpu_s"]
        out.append(
            _row(
                name,
                f"{mine['deliveries_per_cpu_s']} vs {node['deliveries_per_cpu_s']} ({ratio:.2f}x)",
                f">= {bounds[2]:g}x",
                ratio >= bounds[2],
            )
        )
    return out


def _post_cost_rows(posts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One instance alone: posts/s back to back, CPU per post at POST_COST_RATE."""
    alone = [r for r in posts if r["instances"] == 1 and r.get("connections") == POST_COST_CONNS]
    burst = next((r for r in alone if r.get("offered_per_s_per_instance") is None), None)
    paced = next(
        (r for r in alone if r.get("offered_per_s_per_instance") == float(POST_COST_RATE)), None
    )
    return [
        _row(
            "posts: one instance back to back",
            "-" if burst is None else f"{burst['posts_per_s_per_instance']}/s",
            f">= {POSTS_ALONE}/s",
            None if burst is None else burst["posts_per_s_per_instance"] >= POSTS_ALONE,
        ),
        _row(
            f"posts: one instance, {POST_COST_RATE}/s due: gateway CPU per post",
            "-" if paced is None else f"{paced['server_cpu_ms_per_post']} ms",
            f"<= {POST_CPU_MS} ms",
            None
            if paced is None or paced["posts_per_s_per_instance"] < KEPT_UP * POST_COST_RATE
            else paced["server_cpu_ms_per_post"] <= POST_CPU_MS,
        ),
    ]


def verdicts(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    fan = results.get("fanout") or []
    for subscribers, rate in FANOUT_LOADS:
        rows.extend(_fanout_rows(fan, subscribers, rate))
        rows.extend(_versus_node(fan, subscribers, rate))
    idle = next(
        (
            r
            for r in results.get("idle") or []
            if r["target"] == "gateway" and r.get("rooms") == r["connections"]
        ),
        None,
    )
    rows.append(
        _row(
            f"idle: KiB per connection at {IDLE_CONNECTIONS:,}, a room each",
            "-" if idle is None else f"{idle['rss_per_conn_kib']} KiB",
            f"<= {IDLE_KIB} KiB",
            None
            if idle is None or idle["connections"] < IDLE_CONNECTIONS
            else idle["rss_per_conn_kib"] <= IDLE_KIB,
        )
    )
    held = {r["rooms"]: r for r in results.get("rooms") or [] if r["target"] == "gateway"}
    many, few = held.get(ROOMS_MANY), held.get(ROOMS_FEW)
    name = f"rooms: idle CPU, {ROOMS_MANY:,} rooms vs {ROOMS_FEW} (same sockets)"
    if many is None or few is None or many["sockets"] < ROOMS_MANY:
        rows.append(_row(name, "-", f"<= {ROOMS_CPU_RATIO}x", None))
    else:
        ratio = many["idle_cpu_pct"] / few["idle_cpu_pct"] if few["idle_cpu_pct"] > 0 else None
        rows.append(
            _row(
                name,
                f"{many['idle_cpu_pct']} % vs {few['idle_cpu_pct']} % of a core"
                + ("" if ratio is None else f" ({ratio:.2f}x)"),
                f"<= {ROOMS_CPU_RATIO}x",
                ratio is not None and ratio <= ROOMS_CPU_RATIO,
            )
        )
    shared = [
        r
        for r in results.get("posts") or []
        if not (r["instances"] == 1 and r.get("connections") == POST_COST_CONNS)
    ]
    for post in shared or [None]:
        rows.append(_posts_row(post))
    rows.extend(_post_cost_rows(results.get("posts") or []))
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
