"""``GET /v1/stats/events``: live figures as Server-Sent Events.

Every ``interval`` seconds (default 1) the stream sends one ``event: stats``
whose data is a JSON snapshot read from the gateway's Prometheus registry and
its hub: connected clients, message rates (per room from the seq each held
room has reached, so a room's rate counts messages accepted by any instance),
delivery latency over the last interval, history-cache hit rate and
rate-limit refusals. Rates are differences between two consecutive samples of
the same stream, so each dashboard sees its own smooth series and the server
keeps no state for it. The stream ends when the instance shuts down.

With ``scope=cluster`` the figures are the sum over every instance sharing
the Redis: each instance writes its own counters to one Redis hash every
second (:class:`Beacon`), and the stream adds up the entries written in the
last few seconds. Without Redis (``memory://``) the cluster is this instance.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from gateway import validation as v
from gateway.auth import bearer
from gateway.edge import client_address, gateway_of
from gateway.errors import ApiError
from gateway.periodic import every

MAX_ROOMS = 20  # rooms listed per snapshot, busiest first
Labels = dict[str, str]


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


def _quantile(buckets: list[tuple[float, float]], count: float, q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` of cumulative ``buckets``."""
    if count <= 0:
        return None
    for bound, cumulative in buckets:
        if cumulative >= q * count:
            return bound
    return buckets[-1][0] if buckets else None


def stats_key(prefix: str) -> str:
    return f"{prefix}stats"


def add_readings(readings: list[dict[str, Any]]) -> dict[str, Any]:
    """The sum of several instances' readings: counters add, latency buckets add
    bound by bound, a room's seq is the highest seen and its subscribers add."""
    out: dict[str, Any] = {k: 0.0 for k in _COUNTERS}
    buckets: dict[float, float] = {}
    rooms: dict[str, tuple[int, int]] = {}
    for r in readings:
        for k in _COUNTERS:
            out[k] += r[k]
        for bound, value in r["lat_buckets"]:
            buckets[float(bound)] = buckets.get(float(bound), 0.0) + value
        for name, (seq, subs) in r["rooms"].items():
            held = rooms.get(name, (0, 0))
            rooms[name] = (max(held[0], seq), held[1] + subs)
    out["lat_buckets"] = sorted(buckets.items())
    out["rooms"] = rooms
    return out


class Sampler:
    """Turns successive readings into a snapshot with per-second rates."""

    def __init__(self, gw: Any, *, cluster: bool = False) -> None:
        self.gw = gw
        self.cluster = cluster
        self.last: dict[str, Any] | None = None
        self.last_t = 0.0
        self.instances: list[dict[str, Any]] = []

    async def reading(self) -> dict[str, Any]:
        """This instance's reading, or with ``cluster`` the sum over the instances
        whose beacon is fresh (this one's own reading if Redis cannot say)."""
        own = self.read()
        me = self.gw.beacon
        if not self.cluster or me is None:
            self.instances = [self.identity(own)]
            return own
        others = await me.others()
        self.instances = [self.identity(own)] + [
            {**o["who"], "clients": int(o["c"]["ws"] + o["c"]["sse"])} for o in others
        ]
        return add_readings([own] + [o["c"] for o in others])

    def identity(self, own: dict[str, Any]) -> dict[str, Any]:
        gw = self.gw
        return {**_who(gw), "clients": int(own["ws"] + own["sse"])}

    def read(self) -> dict[str, Any]:
        data = samples(self.gw.metrics.registry)
        hub = self.gw.hub
        # Every held room, every second (the beacon): one comprehension, no lookups
        # beyond the two the reading needs.
        rooms: dict[str, tuple[int, int]] = {
            name: (room.seq, len(room.subs))
            for name, room in list(getattr(hub, "rooms", {}).items())
            if room.seq is not None
        }
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
            "rooms": rooms,
        }

    def snapshot(self, cur: dict[str, Any]) -> dict[str, Any]:
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
        gw = self.gw
        return {
            "time": round(now, 3),
            "scope": "cluster" if self.cluster else "instance",
            "instance": {
                "pid": os.getpid(),
                "uptime_s": round(now - gw.started_at, 1),
                "closing": bool(gw.closing),
            },
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
                "p50": ms(_quantile(interval_buckets, lat_n, 0.5)),
                "p95": ms(_quantile(interval_buckets, lat_n, 0.95)),
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
        }


INTERVAL: dict[str, Any] = {"type": "number", "minimum": 1, "maximum": 60, "default": 1.0}


def _interval(raw: str | None) -> float:
    if raw is None:
        return float(INTERVAL["default"])
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not INTERVAL["minimum"] <= value <= INTERVAL["maximum"]:
        raise ApiError(
            "invalid_request",
            "interval must be a number of seconds from "
            f"{INTERVAL['minimum']} to {INTERVAL['maximum']}",
            field="interval",
        )
    return value


SCOPE: dict[str, Any] = {"type": "string", "enum": ["instance", "cluster"], "default": "instance"}
KEY: dict[str, Any] = {
    "type": "string",
    "description": "an API key, where a browser's "
    "EventSource cannot send an Authorization header (auth mode)",
}
QUERY = v.object_schema([], interval=INTERVAL, scope=SCOPE, key=KEY)


def stats_caller(request: Request, gw: Any) -> str:
    """Who the stream is counted against. In auth mode the figures (room names and
    who is in them) need an API key, from ``Authorization: Bearer`` or ``?key=``;
    with no key configured they are refused. In open mode: the client address."""
    if gw.auth.open_mode:
        return client_address(request, gw.settings.trusted_proxies)
    key = bearer(request.headers) or request.query_params.get("key")
    if not gw.auth.keys_required:
        raise ApiError(
            "unauthorized", "the live figures need an API key and none is configured (API_KEYS)"
        )
    gw.auth.check_api_key(key)
    assert key is not None
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:24]


class HeldStream(EventSourceResponse):
    """An event stream that releases its place in the connection limits when it
    ends, however it ends (also when it never got to send a byte)."""

    def __init__(self, *args: Any, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.release = release

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


async def stats_events(request: Request) -> Response:
    gw = gateway_of(request)
    v.only_fields(dict(request.query_params), v.fields(QUERY))
    interval = _interval(request.query_params.get("interval"))
    scope = request.query_params.get("scope", SCOPE["default"])
    if scope not in SCOPE["enum"]:
        raise ApiError("invalid_request", "scope must be instance or cluster", field="scope")
    caller = stats_caller(request, gw)
    if gw.closing:
        raise ApiError("unavailable", "the instance is shutting down; reconnect elsewhere")
    from gateway.core import CONNECT  # the core imports this module

    await gw.rate(CONNECT, caller)
    gw.limits.acquire(caller)
    sampler = Sampler(gw, cluster=scope == "cluster")

    async def stream() -> AsyncIterator[dict[str, str]]:
        while not gw.closing:
            snapshot = sampler.snapshot(await sampler.reading())
            yield {"event": "stats", "data": orjson.dumps(snapshot).decode()}
            await asyncio.sleep(interval)

    # A reader that stopped reading is dropped as on room streams (gateway.app).
    return HeldStream(
        stream(),
        ping=15,
        sep="\n",
        send_timeout=2 * gw.settings.sse_send_timeout,
        release=lambda: gw.limits.release(caller),
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


_COUNTERS = (
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
# A beacon older than this is an instance gone (or cut off from Redis).
FRESH = 3.0


def _who(gw: Any) -> dict[str, Any]:
    return {
        "id": gw.instance_id,
        "pid": os.getpid(),
        "uptime_s": round(time.time() - gw.started_at, 1),
        "closing": bool(gw.closing),
    }


class Beacon:
    """This instance's counters in the shared hash ``stats_key(prefix)``, every
    ``interval`` seconds, for the cluster-wide stream; its entry is removed on
    close (or left to age past ``FRESH`` if the instance dies)."""

    def __init__(
        self, gw: Any, redis: Any, prefix: str, guard: Any | None = None, interval: float = 1.0
    ) -> None:
        self.gw = gw
        self.redis = redis
        self.key = stats_key(prefix)
        self.guard = guard
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = every(self.interval, self.write, "stats beacon", now=True)

    async def write(self) -> None:
        if self.guard is not None and not self.guard.usable(self.key):
            return  # Redis failed moments ago: the other users report it
        reading = Sampler(self.gw).read()
        # JSON has no infinity: the last bucket's bound goes as text ("inf").
        reading["lat_buckets"] = [[str(b), v] for b, v in reading["lat_buckets"]]
        entry = {"who": _who(self.gw), "t": time.time(), "c": reading}
        try:
            await self.redis.hset(self.key, self.gw.instance_id, orjson.dumps(entry))
            await self.redis.pexpire(self.key, int(FRESH * 10_000))
        except Exception:
            if self.guard is not None:
                self.guard.failed(self.key)

    async def others(self) -> list[dict[str, Any]]:
        """The fresh entries of the other instances (none if Redis cannot say)."""
        if self.guard is not None and not self.guard.usable(self.key):
            return []
        try:
            raw = await self.redis.hgetall(self.key)
        except Exception:
            if self.guard is not None:
                self.guard.failed(self.key)
            return []
        now = time.time()
        out = []
        for field_, value in raw.items():
            name = field_.decode() if isinstance(field_, bytes) else field_
            if name == self.gw.instance_id:
                continue
            try:
                entry = orjson.loads(value)
            except orjson.JSONDecodeError:
                continue
            if now - float(entry.get("t", 0)) <= FRESH:
                out.append(entry)
        return out

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            await self.redis.hdel(self.key, self.gw.instance_id)
        except Exception:
            pass
