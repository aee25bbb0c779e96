"""The figures of the live stats stream: readings of the Prometheus registry and the
hub, their sum over instances, and snapshots with per-second rates.

A reading is this instance's counters at one moment: connected clients, messages
accepted and delivered, the delivery latency histogram, history-cache lookups,
rate-limit refusals, and per held room the seq it has reached and its
subscribers. A snapshot turns two consecutive readings of one stream into rates
(so every dashboard sees its own smooth series and the server keeps no state for
it); a room's rate counts messages accepted by any instance, since it comes from
the room's seq.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

from chat_gateway.metrics import Metrics

MAX_ROOMS = 20  # rooms listed per snapshot, busiest first
Labels = dict[str, str]
Reading = dict[str, Any]

# The keys of a reading that add up over instances.
COUNTERS = (
    "ws",
    "sse",
    "subscriptions",
    "accepted",
    "delivered",
    "lat_count",
    "lat_sum",
    "hits",
    "lookups",
    "limited",
)


def samples(registry: Any) -> dict[str, list[tuple[Labels, float]]]:
    """Every sample of the registry by sample name, e.g. ``chat_x_total``."""
    out: dict[str, list[tuple[Labels, float]]] = {}
    for family in registry.collect():
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def total(
    data: dict[str, list[tuple[Labels, float]]],
    name: str,
    match: Callable[[Labels], bool] = lambda labels: True,
) -> float:
    return sum(value for labels, value in data.get(name, []) if match(labels))


def quantile(buckets: list[tuple[float, float]], count: float, q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` of cumulative ``buckets``."""
    if count <= 0:
        return None
    for bound, cumulative in buckets:
        if cumulative >= q * count:
            return bound
    return buckets[-1][0] if buckets else None


def read(metrics: Metrics, held: Mapping[str, tuple[int, int]]) -> Reading:
    """This instance's reading: its registry, and the hub's ``held`` rooms with their
    seq and subscribers (``Hub.positions``: every room, every second, so nothing
    more is asked of each)."""
    data = samples(metrics.registry)
    buckets = sorted(
        (float(labels["le"]), value)
        for labels, value in data.get("chat_delivery_latency_seconds_bucket", [])
    )
    return {
        "ws": total(data, "chat_connections", lambda lb: lb.get("transport") == "ws"),
        "sse": total(data, "chat_connections", lambda lb: lb.get("transport") == "sse"),
        "subscriptions": total(data, "chat_subscriptions"),
        "accepted": total(data, "chat_messages_accepted_total"),
        "delivered": total(data, "chat_messages_delivered_total"),
        "lat_count": total(data, "chat_delivery_latency_seconds_count"),
        "lat_sum": total(data, "chat_delivery_latency_seconds_sum"),
        "lat_buckets": buckets,
        "hits": total(data, "chat_history_cache_total", lambda lb: lb.get("outcome") == "hit"),
        "lookups": total(data, "chat_history_cache_total"),
        "limited": total(
            data, "chat_rate_limit_decisions_total", lambda lb: lb.get("decision") != "allowed"
        ),
        "rooms": held,
        "webhooks": webhooks(data),
    }


BREAKER = {0: "closed", 1: "half_open", 2: "open", 3: "disabled"}


def webhooks(data: dict[str, list[tuple[Labels, float]]]) -> dict[str, list[float]] | None:
    """Per receiver ``[backlog, oldest pending seconds, breaker state number]``; None
    when this instance sends no webhooks."""
    if "chat_webhook_backlog" not in data:
        return None
    out: dict[str, list[float]] = {}
    for i, name in enumerate(
        (
            "chat_webhook_backlog",
            "chat_webhook_oldest_pending_seconds",
            "chat_webhook_breaker_state",
        )
    ):
        for labels, value in data.get(name, []):
            out.setdefault(labels.get("endpoint", ""), [0.0, 0.0, 0.0])[i] = value
    return out


def add_readings(readings: list[Reading]) -> Reading:
    """The sum of several instances' readings: counters add, latency buckets add
    bound by bound, a room's seq is the highest seen and its subscribers add."""
    out: Reading = {k: 0.0 for k in COUNTERS}
    buckets: dict[float, float] = {}
    rooms: dict[str, tuple[int, int]] = {}
    for r in readings:
        for k in COUNTERS:
            out[k] += r[k]
        for bound, value in r["lat_buckets"]:
            buckets[float(bound)] = buckets.get(float(bound), 0.0) + value
        for name, (seq, subs) in r["rooms"].items():
            held = rooms.get(name, (0, 0))
            rooms[name] = (max(held[0], seq), held[1] + subs)
    out["lat_buckets"] = sorted(buckets.items())
    out["rooms"] = rooms
    # The outbox is shared: every instance sees the same backlog; a breaker is each
    # instance's own, and the worst one is shown.
    hooks: dict[str, list[float]] | None = None
    for r in readings:
        for endpoint, figures in (r.get("webhooks") or {}).items():
            hooks = {} if hooks is None else hooks
            held_figures = hooks.get(endpoint, [0.0, 0.0, 0.0])
            hooks[endpoint] = [max(a, b) for a, b in zip(held_figures, figures, strict=True)]
    out["webhooks"] = hooks
    return out


def describe_instance(instance_id: str, started_at: float, closing: bool) -> dict[str, Any]:
    """Who an instance is, as listed in a snapshot's ``instances``."""
    return {
        "id": instance_id,
        "pid": os.getpid(),
        "uptime_s": round(time.time() - started_at, 1),
        "closing": closing,
    }


# An instance's counters and description, as another instance shared them.
Shared = Mapping[str, Any]


class Sampler:
    """Turns successive readings into snapshots with per-second rates.

    ``own`` reads this instance; ``describe`` says who it is; ``others`` (cluster
    scope only) gives the other instances' shared entries.
    """

    def __init__(
        self,
        own: Callable[[], Reading],
        describe: Callable[[], dict[str, Any]],
        others: Callable[[], Awaitable[list[Shared]]] | None = None,
    ) -> None:
        self.own = own
        self.describe = describe
        self.others = others
        self.last: Reading | None = None
        self.last_t = 0.0
        self.instances: list[dict[str, Any]] = []

    @property
    def cluster(self) -> bool:
        return self.others is not None

    async def reading(self) -> Reading:
        """This instance's reading, or in cluster scope the sum over the instances
        whose shared entry is fresh."""
        own = self.own()
        me = {
            **self.describe(),
            "clients": int(own["ws"] + own["sse"]),
            "accepted": int(own["accepted"]),
        }
        if self.others is None:
            self.instances = [me]
            return own
        others = await self.others()
        self.instances = [me] + [
            {
                **o["who"],
                "clients": int(o["c"]["ws"] + o["c"]["sse"]),
                "accepted": int(o["c"]["accepted"]),
            }
            for o in others
        ]
        return add_readings([own] + [o["c"] for o in others])

    def snapshot(self, cur: Reading) -> dict[str, Any]:
        now = time.time()
        prev = self.last or cur
        dt = max(1e-3, now - self.last_t) if self.last is not None else 1.0
        self.last, self.last_t = cur, now

        def rate(key: str) -> float:
            return round(max(0.0, float(cur[key] - prev[key])) / dt, 3)

        lat_n = cur["lat_count"] - prev["lat_count"]
        interval_buckets = [
            (b, c - p)
            for (b, c), (_, p) in zip(cur["lat_buckets"], prev["lat_buckets"], strict=False)
        ]
        if len(interval_buckets) != len(cur["lat_buckets"]):
            interval_buckets = cur["lat_buckets"]

        def ms(seconds: float | None) -> float | None:
            return None if seconds is None or seconds == float("inf") else round(seconds * 1000, 3)

        lookups = cur["lookups"] - prev["lookups"]
        rooms = []
        for name, (seq, subs) in cur["rooms"].items():
            before = prev["rooms"].get(name, (seq, 0))[0]
            rooms.append(
                {
                    "room": name,
                    "seq": seq,
                    "subscribers": subs,
                    "per_s": round(max(0, seq - before) / dt, 3),
                }
            )
        rooms.sort(key=lambda r: (-r["per_s"], -r["subscribers"], r["room"]))
        me = self.describe()
        return {
            "time": round(now, 3),
            "scope": "cluster" if self.cluster else "instance",
            "instance": {"pid": me["pid"], "uptime_s": me["uptime_s"], "closing": me["closing"]},
            "instances": self.instances,
            "clients": {
                "ws": int(cur["ws"]),
                "sse": int(cur["sse"]),
                "total": int(cur["ws"] + cur["sse"]),
            },
            "subscriptions": int(cur["subscriptions"]),
            "messages": {
                "accepted_total": int(cur["accepted"]),
                "accepted_per_s": rate("accepted"),
                "delivered_total": int(cur["delivered"]),
                "delivered_per_s": rate("delivered"),
            },
            "rooms": rooms[:MAX_ROOMS],
            "rooms_held": len(rooms),
            "latency_ms": {
                "count": int(lat_n),
                "mean": ms((cur["lat_sum"] - prev["lat_sum"]) / lat_n) if lat_n > 0 else None,
                "p50": ms(quantile(interval_buckets, lat_n, 0.5)),
                "p95": ms(quantile(interval_buckets, lat_n, 0.95)),
            },
            "cache": {
                "hits_total": int(cur["hits"]),
                "lookups_total": int(cur["lookups"]),
                "hit_rate": round((cur["hits"] - prev["hits"]) / lookups, 4)
                if lookups > 0
                else None,
                "hit_rate_total": round(cur["hits"] / cur["lookups"], 4)
                if cur["lookups"] > 0
                else None,
            },
            "rate_limited": {"total": int(cur["limited"]), "per_s": rate("limited")},
            "webhooks": None
            if cur.get("webhooks") is None
            else [
                {
                    "endpoint": endpoint,
                    "backlog": int(backlog),
                    "oldest_pending_s": round(oldest, 1),
                    "breaker": BREAKER.get(int(state), "unknown"),
                }
                for endpoint, (backlog, oldest, state) in sorted(cur["webhooks"].items())
            ],
        }


class Sharing(Protocol):
    """Where the other instances' figures come from (chat_gateway.ops.shared_figures)."""

    async def others(self) -> list[Shared]: ...


class _Alone:
    async def others(self) -> list[Shared]:
        return []


class Figures:
    """This instance's figures: its reading (the registry and the hub's held rooms,
    ``positions``), who it is, and samplers over it or over every instance once
    :meth:`share` gave it the figures the others share."""

    def __init__(
        self,
        metrics: Metrics,
        positions: Callable[[], Mapping[str, tuple[int, int]]],
        *,
        instance_id: str,
        started_at: float,
        closing: Callable[[], bool],
    ) -> None:
        self.metrics = metrics
        self.positions = positions
        self.instance_id = instance_id
        self.started_at = started_at
        self.closing = closing
        self.shared: Sharing = _Alone()

    def share(self, shared: Sharing) -> None:
        self.shared = shared

    def reading(self) -> Reading:
        """This instance's figures now."""
        return read(self.metrics, self.positions())

    def describe(self) -> dict[str, Any]:
        return describe_instance(self.instance_id, self.started_at, self.closing())

    async def others(self) -> list[Shared]:
        """The other instances' fresh shared entries (none without Redis)."""
        return await self.shared.others()

    def sampler(self, *, cluster: bool) -> Sampler:
        """Snapshots of this instance's figures, or with ``cluster`` of every instance's."""
        return Sampler(self.reading, self.describe, self.others if cluster else None)
