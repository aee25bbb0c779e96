"""Token-bucket rate limiting, shared by all instances through Redis.

One Lua script does the whole decision in one round trip, on Redis server time
(instances with skewed clocks agree), in integer microsecond arithmetic so the
refill is exact: a bucket of ``capacity`` refills ``capacity`` tokens every
``period`` seconds. Tokens are kept scaled by the period in microseconds, so
every quantity is an integer well inside a double's exact range.

With ``memory://`` (or while Redis is unreachable) the same arithmetic runs in
process on the local monotonic clock. The fallback keeps limiting (per
instance) rather than letting a flood through or refusing everyone, and a
metric and a log line say it is active.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from gateway.config import Rate

log = logging.getLogger("gateway.ratelimit")

_SCRIPT = """
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


def _decide(rate: Rate, period_us: int, value: int, need: int, allowed: bool) -> Decision:
    full = rate.capacity * period_us
    remaining = value // period_us
    reset = (full - value) / rate.capacity / 1e6
    retry = 0.0 if allowed else (need - value) / rate.capacity / 1e6
    return Decision(allowed, rate.capacity, remaining, reset, retry)


class _LocalBuckets:
    """The same bucket arithmetic in process, on the monotonic clock."""

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[int, int]] = {}

    def hit(self, key: str, rate: Rate, period_us: int, cost: int) -> Decision:
        now = int(time.monotonic() * 1e6)
        full = rate.capacity * period_us
        value, ts = self._buckets.get(key, (full, now))
        if now > ts:
            value = min(full, value + (now - ts) * rate.capacity)
            ts = now
        need = cost * period_us
        allowed = value >= need
        if allowed:
            value -= need
        self._buckets[key] = (value, ts)
        if len(self._buckets) > 100_000:
            self._evict(now)
        return _decide(rate, period_us, value, need, allowed)

    def _evict(self, now: int) -> None:
        # Drop buckets idle long enough to be full again: they carry no state.
        for key, (_value, ts) in list(self._buckets.items()):
            if now - ts > 3600 * 1_000_000:
                del self._buckets[key]


class RateLimiter:
    def __init__(self, redis: Any | None, *, prefix: str = "chat:", metrics: Any | None = None,
                 rates: dict[str, Rate], guard: Any | None = None) -> None:
        self.redis = redis
        self.guard = guard  # has usable() and failed(): skip Redis right after a failure
        self.prefix = prefix
        self.metrics = metrics
        self.rates = rates
        self._local = _LocalBuckets()
        self._fallback = False
        self._script = redis.register_script(_SCRIPT) if redis is not None else None

    async def hit(self, action: str, identity: str, cost: int = 1) -> Decision:
        rate = self.rates[action]
        period_us = max(1, round(rate.period * 1_000_000))
        key = f"{self.prefix}rl:{action}:{{{identity}}}"
        decision: Decision | None = None
        if self._script is not None and (self.guard is None or self.guard.usable()):
            try:
                allowed, value, _full, need = await self._script(
                    keys=[key], args=[rate.capacity, period_us, cost])
                decision = _decide(rate, period_us, int(value), int(need), bool(allowed))
                self._set_fallback(False)
            except Exception as exc:  # noqa: BLE001 - Redis down: limit per instance
                if self.guard is not None:
                    self.guard.failed()
                self._set_fallback(True, exc)
        if decision is None:
            decision = self._local.hit(key, rate, period_us, cost)
        if self.metrics is not None:
            self.metrics.rate_limit.labels(action, "allowed" if decision.allowed
                                           else "limited").inc()
        return decision

    def _set_fallback(self, on: bool, exc: Exception | None = None) -> None:
        if on != self._fallback:
            self._fallback = on
            if on:
                log.warning("rate limiter: Redis unreachable (%r); using per-instance buckets",
                            exc)
            else:
                log.warning("rate limiter: Redis reachable again; shared buckets restored")
            if self.metrics is not None:
                self.metrics.rate_limit_fallback.set(1 if on else 0)
