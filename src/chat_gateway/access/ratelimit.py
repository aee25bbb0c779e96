"""Token-bucket rate limiting, shared by all instances through Redis.

One Lua script does the whole decision in one round trip, on Redis server time
(instances with skewed clocks agree), in integer microsecond arithmetic so the
refill is exact: a bucket of ``capacity`` refills ``capacity`` tokens every
``period`` seconds. Tokens are kept scaled by the period in microseconds, so
every quantity is an integer well inside a double's exact range.

With ``memory://`` (:class:`LocalRateLimiter`), or while Redis is unreachable,
the same arithmetic runs in process on the local monotonic clock. The fallback
keeps limiting (per instance) rather than letting a flood through or refusing
everyone, and a metric and a log line say it is active.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from chat_gateway.config import Rate, Settings
from chat_gateway.core.namespaces import Namespace, Namespaces
from chat_gateway.errors import ApiError
from chat_gateway.metrics import Metrics
from chat_gateway.redisio.context import RedisContext
from chat_gateway.redisio.script import Script

log = logging.getLogger("gateway.ratelimit")

# The buckets, by action.
POST = "post"  # message posts: HTTP and WS publish frames share one bucket
PUBLISH = "publish"  # POST /v1/publish
CONNECT = "connect"  # WebSocket and SSE connection attempts
SUBSCRIBE = "subscribe"  # WebSocket subscribe frames
SEARCH = "search"  # GET /v1/search
READ = "read"  # read positions marked: POST /v1/rooms/{room}/read and WS read frames
REACT = "react"  # reactions added or removed: HTTP and WS react/unreact frames


def post_action(namespace: Namespace) -> str:
    """The bucket of posts and emits in ``namespace``: ``post``, or its own where the
    namespace overrides ``RATE_LIMIT`` (``NAMESPACES_FILE``)."""
    return POST if namespace.rate_limit is None else f"{POST}@{namespace.name}"


def rates_of(settings: Settings) -> dict[str, Rate]:
    """Each action's rate as configured (a namespace's ``rate_limit`` is one more)."""
    overrides = {
        post_action(ns): Rate.parse(ns.rate_limit, "rate_limit")
        for ns in settings.namespaces_file.rules.values()
        if ns.rate_limit is not None
    }
    return {
        **overrides,
        POST: settings.rate_limit,
        PUBLISH: settings.publish_rate_limit,
        CONNECT: settings.connect_rate_limit,
        SUBSCRIBE: settings.subscribe_rate_limit,
        SEARCH: settings.search_rate_limit,
        READ: settings.read_rate_limit,
        REACT: settings.reaction_rate_limit,
    }


SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cap = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local full = cap * period
local b = redis.call('HMGET', KEYS[1], 'v', 't')
local v = tonumber(b[1])
local ts = tonumber(b[2])
if v == nil or ts == nil then
  v = full
  ts = now
end
if now > ts then
  v = math.min(full, v + (now - ts) * cap)
  ts = now
end
local need = cost * period
local allowed = 0
if v >= need then
  v = v - need
  allowed = 1
end
redis.call('HSET', KEYS[1], 'v', string.format('%.0f', v), 't', string.format('%.0f', ts))
redis.call('PEXPIRE', KEYS[1], math.ceil(period / 1000) + 1000)
return {allowed, string.format('%.0f', v), string.format('%.0f', full), string.format('%.0f', need)}
"""


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    reset: float  # seconds until the bucket is full again
    retry_after: float  # seconds until ``cost`` tokens are there (0 when allowed)

    def headers(self) -> dict[str, str]:
        out = {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(math.ceil(self.reset)),
        }
        if not self.allowed:
            out["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return out


def take(
    value: int, ts: int, now: int, capacity: int, period_us: int, cost: int
) -> tuple[bool, int, int, int]:
    """One bucket decision in integer arithmetic, the same as the Lua script's.

    ``value`` is the bucket's content in token-microseconds-per-period units
    (one token = ``period_us``), ``ts`` the time of its last update and ``now``
    the current time, both in microseconds. Returns ``(allowed, value, ts,
    need)`` after the decision.
    """
    if now > ts:
        value = min(capacity * period_us, value + (now - ts) * capacity)
        ts = now
    need = cost * period_us
    allowed = value >= need
    if allowed:
        value -= need
    return allowed, value, ts, need


def _decide(rate: Rate, period_us: int, value: int, need: int, allowed: bool) -> Decision:
    full = rate.capacity * period_us
    remaining = value // period_us
    reset = (full - value) / rate.capacity / 1e6
    retry = 0.0 if allowed else (need - value) / rate.capacity / 1e6
    return Decision(allowed, rate.capacity, remaining, reset, retry)


def period_us(rate: Rate) -> int:
    return max(1, round(rate.period * 1_000_000))


class LocalBuckets:
    """The same bucket arithmetic in process, on a monotonic microsecond clock."""

    MAX_BUCKETS = 100_000

    def __init__(self, clock: Callable[[], int] | None = None) -> None:
        self._clock = clock or (lambda: time.monotonic_ns() // 1000)
        self._buckets: dict[str, tuple[int, int]] = {}

    def hit(self, key: str, rate: Rate, cost: int = 1) -> Decision:
        now = self._clock()
        pus = period_us(rate)
        value, ts = self._buckets.get(key, (rate.capacity * pus, now))
        allowed, value, ts, need = take(value, ts, now, rate.capacity, pus, cost)
        self._buckets[key] = (value, ts)
        if len(self._buckets) > self.MAX_BUCKETS:
            self._evict(now)
        return _decide(rate, pus, value, need, allowed)

    def _evict(self, now: int) -> None:
        # Drop buckets idle long enough to be full again: they carry no state.
        for key, (_value, ts) in list(self._buckets.items()):
            if now - ts > 3600 * 1_000_000:
                del self._buckets[key]


class LocalRateLimiter:
    """Token buckets per (action, identity) on this instance alone (``memory://``)."""

    def __init__(
        self, *, prefix: str = "chat:", metrics: Metrics | None = None, rates: dict[str, Rate]
    ) -> None:
        self.prefix = prefix
        # Decisions are counted; without a gateway's metrics, in a registry of their own.
        self.metrics = metrics if metrics is not None else Metrics()
        self.rates = rates
        self.local = LocalBuckets()

    def key(self, action: str, identity: str) -> str:
        return f"{self.prefix}rl:{action}:{{{identity}}}"

    async def hit(self, action: str, identity: str, cost: int = 1) -> Decision:
        decision = await self._decide(self.key(action, identity), self.rates[action], cost)
        self.metrics.rate_limit.labels(action, "allowed" if decision.allowed else "limited").inc()
        return decision

    async def _decide(self, key: str, rate: Rate, cost: int) -> Decision:
        return self.local.hit(key, rate, cost)

    @property
    def fallback(self) -> bool:
        """Whether some decisions are made on this instance's buckets for want of Redis."""
        return False


class RateLimiter(LocalRateLimiter):
    """Token buckets per (action, identity) in Redis, shared by every instance.

    While Redis is unreachable (an error, or no answer within the client's
    command timeout) the decision is made on this instance's own buckets. The
    ``guard`` shared with the other Redis users (``chat_gateway.redisio.guard.RedisGuard``) skips
    Redis for a moment after a failure, so an outage costs one caller one
    timeout rather than every request its own. Over a cluster that is per
    shard: identities whose buckets live on a healthy shard keep sharing them.
    Without a guard every decision tries Redis.
    """

    def __init__(
        self,
        redis: RedisContext,
        *,
        prefix: str = "chat:",
        metrics: Metrics | None = None,
        rates: dict[str, Rate],
    ) -> None:
        super().__init__(prefix=prefix, metrics=metrics, rates=rates)
        self.redis = redis.client
        # Skips Redis right after a failure (a context without a guard never skips).
        self.guard = redis.guard
        self._failing: set[str] = set()  # shards (guard.shard) whose buckets are local now
        # EVALSHA, and the script's body again after a NOSCRIPT (chat_gateway.redisio.script).
        self._script = Script(self.redis, SCRIPT)
        # Decisions asked for at the same moment share one pipeline (chat_gateway.redisio.pipelined);
        # none on a cluster, where keys live on different nodes.
        self.batch = redis.batch

    async def _decide(self, key: str, rate: Rate, cost: int) -> Decision:
        shard = self.guard.shard(key)  # looked up once
        if not self.guard.shard_usable(shard):
            self._set_fallback(shard, True, "skipped: Redis failed moments ago")
            return self.local.hit(key, rate, cost)
        pus = period_us(rate)
        try:
            allowed, value, _full, need = await self._script(
                [key], [rate.capacity, pus, cost], batch=self.batch
            )
        except Exception as exc:
            self.guard.shard_failed(shard, exc)
            self._set_fallback(shard, True, exc)
            return self.local.hit(key, rate, cost)
        self._set_fallback(shard, False)
        return _decide(rate, pus, int(value), int(need), bool(allowed))

    @property
    def fallback(self) -> bool:
        return bool(self._failing)

    def _set_fallback(self, shard: str, on: bool, why: object = None) -> None:
        was = self.fallback
        if on:
            self._failing.add(shard)
        else:
            self._failing.discard(shard)
        if self.fallback != was:
            if on:
                log.warning("rate limiter: Redis unreachable (%r); using per-instance buckets", why)
            else:
                log.warning("rate limiter: Redis reachable again; shared buckets restored")
            self.metrics.rate_limit_fallback.set(1 if on else 0)


class Rates:
    """The limiter as routes and frames use it: one token of ``action``'s bucket for
    ``identity`` per call, refused with 429 ``rate_limited``. Posts and emits take
    their room's namespace's bucket (:meth:`check_post`)."""

    def __init__(self, limiter: LocalRateLimiter, namespaces: Namespaces | None = None) -> None:
        self.limiter = limiter
        self.namespaces = namespaces or Namespaces()

    async def check_post(self, room: str, identity: str) -> Decision:
        """One token of the post bucket of ``room``'s namespace (see :func:`post_action`)."""
        return await self.check(post_action(self.namespaces.of(room)), identity)

    async def check(self, action: str, identity: str) -> Decision:
        """The decision (its headers go on the answer); ``ApiError`` when refused."""
        decision = await self.limiter.hit(action, identity)
        if not decision.allowed:
            raise ApiError(
                "rate_limited",
                f"too many requests; retry in {decision.retry_after:.1f} s",
                headers=decision.headers(),
                retry_after=round(decision.retry_after, 3),
            )
        return decision
