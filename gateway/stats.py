"""``GET /v1/stats/events``: this instance's live figures as Server-Sent Events.

Every ``interval`` seconds (default 1) the stream sends one ``event: stats``
whose data is a JSON snapshot read from the gateway's Prometheus registry and
its hub: connected clients, message rates (per room from the seq each held
room has reached, so a room's rate counts messages accepted by any instance),
delivery latency over the last interval, history-cache hit rate and
rate-limit refusals. Rates are differences between two consecutive samples of
the same stream, so each dashboard sees its own smooth series and the server
keeps no state for it. The stream ends when the instance shuts down.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, AsyncIterator, Callable

import orjson
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from gateway.edge import gateway_of
from gateway.errors import ApiError

MAX_ROOMS = 20  # rooms listed per snapshot, busiest first
Labels = dict[str, str]


def samples(registry: Any) -> dict[str, list[tuple[Labels, float]]]:
    """Every sample of the registry by sample name, e.g. ``chat_x_total``."""
    out: dict[str, list[tuple[Labels, float]]] = {}
    for family in registry.collect():
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def total(data: dict[str, list[tuple[Labels, float]]], name: str,
          match: Callable[[Labels], bool] = lambda labels: True) -> float:
    return sum(value for labels, value in data.get(name, []) if match(labels))


def _quantile(buckets: list[tuple[float, float]], count: float, q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` of cumulative ``buckets``."""
    if count <= 0:
        return None
    for bound, cumulative in buckets:
        if cumulative >= q * count:
            return bound
    return buckets[-1][0] if buckets else None


class Sampler:
    """Turns successive registry readings into a snapshot with per-second rates."""

    def __init__(self, gw: Any) -> None:
        self.gw = gw
        self.last: dict[str, Any] | None = None
        self.last_t = 0.0

    def read(self) -> dict[str, Any]:
        data = samples(self.gw.metrics.registry)
        hub = self.gw.hub
        rooms: dict[str, tuple[int, int]] = {}
        for name, room in list(getattr(hub, "rooms", {}).items()):
            seq = getattr(room, "seq", None)
            if seq is not None:
                rooms[name] = (seq, len(getattr(room, "subs", ())))
        buckets = sorted(
            (float(labels["le"]), value)
            for labels, value in data.get("chat_delivery_latency_seconds_bucket", []))
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
            "limited": total(data, "chat_rate_limit_decisions_total",
                             lambda lb: lb.get("decision") != "allowed"),
            "rooms": rooms,
        }

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        cur = self.read()
        prev = self.last or cur
        dt = max(1e-3, now - self.last_t) if self.last is not None else 1.0
        self.last, self.last_t = cur, now

        def rate(key: str) -> float:
            return round(max(0.0, cur[key] - prev[key]) / dt, 3)

        lat_n = cur["lat_count"] - prev["lat_count"]
        interval_buckets = [(b, c - p) for (b, c), (_, p) in
                            zip(cur["lat_buckets"], prev["lat_buckets"], strict=False)]
        if len(interval_buckets) != len(cur["lat_buckets"]):
            interval_buckets = cur["lat_buckets"]

        def ms(seconds: float | None) -> float | None:
            return None if seconds is None or seconds == float("inf") else round(
                seconds * 1000, 3)

        lookups = cur["lookups"] - prev["lookups"]
        rooms = []
        for name, (seq, subs) in cur["rooms"].items():
            before = prev["rooms"].get(name, (seq, 0))[0]
            rooms.append({"room": name, "seq": seq, "subscribers": subs,
                          "per_s": round(max(0, seq - before) / dt, 3)})
        rooms.sort(key=lambda r: (-r["per_s"], -r["subscribers"], r["room"]))
        gw = self.gw
        return {
            "time": round(now, 3),
            "instance": {"pid": os.getpid(), "uptime_s": round(now - gw.started_at, 1),
                         "closing": bool(gw.closing)},
            "clients": {"ws": int(cur["ws"]), "sse": int(cur["sse"]),
                        "total": int(cur["ws"] + cur["sse"])},
            "subscriptions": int(cur["subscriptions"]),
            "messages": {"accepted_total": int(cur["accepted"]),
                         "accepted_per_s": rate("accepted"),
                         "delivered_total": int(cur["delivered"]),
                         "delivered_per_s": rate("delivered")},
            "rooms": rooms[:MAX_ROOMS],
            "rooms_held": len(rooms),
            "latency_ms": {
                "count": int(lat_n),
                "mean": ms((cur["lat_sum"] - prev["lat_sum"]) / lat_n) if lat_n > 0 else None,
                "p50": ms(_quantile(interval_buckets, lat_n, 0.5)),
                "p95": ms(_quantile(interval_buckets, lat_n, 0.95)),
            },
            "cache": {"hits_total": int(cur["hits"]), "lookups_total": int(cur["lookups"]),
                      "hit_rate": round((cur["hits"] - prev["hits"]) / lookups, 4)
                      if lookups > 0 else None,
                      "hit_rate_total": round(cur["hits"] / cur["lookups"], 4)
                      if cur["lookups"] > 0 else None},
            "rate_limited": {"total": int(cur["limited"]), "per_s": rate("limited")},
        }


INTERVAL: dict[str, Any] = {"type": "number", "minimum": 0.2, "maximum": 60, "default": 1.0}


def _interval(raw: str | None) -> float:
    if raw is None:
        return float(INTERVAL["default"])
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not INTERVAL["minimum"] <= value <= INTERVAL["maximum"]:
        raise ApiError("invalid_request", "interval must be a number of seconds from "
                       f"{INTERVAL['minimum']} to {INTERVAL['maximum']}", field="interval")
    return value


async def stats_events(request: Request) -> Response:
    gw = gateway_of(request)
    interval = _interval(request.query_params.get("interval"))
    if gw.closing:
        raise ApiError("unavailable", "the instance is shutting down; reconnect elsewhere")
    sampler = Sampler(gw)

    async def stream() -> AsyncIterator[dict[str, str]]:
        while not gw.closing:
            yield {"event": "stats", "data": orjson.dumps(sampler.snapshot()).decode()}
            await asyncio.sleep(interval)

    return EventSourceResponse(stream(), ping=15, sep="\n",
                               headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})
