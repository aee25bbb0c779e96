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

Leases. A bucket that holds many tokens (at least 32) is not asked once per
decision: an instance takes a few tokens more than its waiting callers need
(``RATE_LIMIT_LEASE`` at most, at most 1/32 of the capacity, more only while
they run out quickly) and spends them locally for at most
``RATE_LIMIT_LEASE_HOLD`` seconds, then settles: unused tokens go back to the
bucket, used ones are declared. Redis keeps the tokens on lease in the bucket
(``l``) and lets the bucket refill only up to ``capacity - l``, so the tokens
in the bucket and on lease never exceed the capacity together: over any window
no more is admitted, across all instances, than the capacity plus the refill.
A lease not settled by its holder (an instance that died) lapses in Redis
``RATE_LIMIT_LEASE_HOLD`` after it was granted; the holder stops spending its
tokens before that, on its own clock (a settlement of a lapsed lease, told by
its generation ``g``, counts for nothing). Callers waiting on the same bucket
at once share one script call. A bucket seen short is not asked again for
``EMPTY_RECHECK`` seconds (or until its next token, if sooner): a refusal in
that time costs no round trip.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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


# Tokens for ``direct`` callers waiting now and up to ``extra`` more on lease, after
# settling the caller's previous lease (generation ARGV[5]: ``used`` of its tokens
# spent, ``returned`` unspent). Tokens on lease (``l``) cap the refill, so the
# bucket and the leases never hold more than the capacity together; all leases
# lapse at ``e`` (the latest grant + ``hold``), which starts a new generation.
LEASE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cap = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local direct = tonumber(ARGV[3])
local extra = tonumber(ARGV[4])
local gen = tonumber(ARGV[5])
local used = tonumber(ARGV[6])
local returned = tonumber(ARGV[7])
local hold = tonumber(ARGV[8])
local full = cap * period
local b = redis.call('HMGET', KEYS[1], 'v', 't', 'l', 'e', 'g')
local v = tonumber(b[1])
local ts = tonumber(b[2])
local l = tonumber(b[3]) or 0
local e = tonumber(b[4]) or 0
local g = tonumber(b[5]) or 0
if v == nil or ts == nil then
  v = full
  ts = now
end
if l > 0 and now > e then
  l = 0
  g = g + 1
end
if gen == g and l > 0 then
  l = math.max(0, l - used - returned)
  v = v + returned * period
end
if now > ts then
  v = v + (now - ts) * cap
  ts = now
end
local top = full - l * period
if v > top then
  v = top
end
local avail = math.floor(v / period)
local gd = math.min(direct, avail)
local ge = math.min(extra, avail - gd)
v = v - (gd + ge) * period
if ge > 0 then
  l = l + ge
  if now + hold > e then
    e = now + hold
  end
end
redis.call('HSET', KEYS[1], 'v', string.format('%.0f', v), 't', string.format('%.0f', ts),
  'l', l, 'e', string.format('%.0f', e), 'g', g)
local ttl = math.ceil(period / 1000) + 1000
if l > 0 then
  ttl = ttl + math.ceil(hold / 1000)
end
redis.call('PEXPIRE', KEYS[1], ttl)
return {gd, ge, string.format('%.0f', v), g}
"""

# A bucket seen short is asked again after at most this long (seconds).
EMPTY_RECHECK = 0.05
# Buckets smaller than this many leasable tokens' worth are never leased beyond
# the callers waiting: a lease takes at most capacity // LEASE_SHARE tokens.
LEASE_SHARE = 32


@dataclass(slots=True)
class Lease:
    """One bucket as this instance sees it: tokens on lease, what Redis said last,
    and the callers waiting for the next script call."""

    tokens: int = 0  # leased, unspent, usable until ``deadline``
    leased: int = 0  # tokens of the current lease (``tokens`` of them unspent)
    gen: int = -1  # the current lease's generation in Redis (-1: none)
    deadline: int = 0  # local µs after which the lease's tokens are not spent
    seen: int = 0  # the bucket's value (token x period units) at the last answer
    seen_at: int = 0  # local µs of the last answer
    short_until: int = 0  # local µs until which the bucket counts as empty
    extra: int = 0  # tokens asked beyond the waiting callers next time
    busy: bool = False  # a script call for this bucket is in flight
    rate: Rate | None = None  # the bucket's rate, for a settlement made by the sweep
    queue: list[asyncio.Future[Decision | None]] = field(default_factory=list)

    def spend(self, now: int) -> int | None:
        """One leased token, or None; the tokens left when one was spent."""
        if self.tokens and now < self.deadline:
            self.tokens -= 1
            return self.tokens
        return None

    def settlement(self, now: int) -> tuple[int, int, int]:
        """(generation, used, returned) of the current lease, now given up."""
        if not self.leased:
            return -1, 0, 0
        returned = self.tokens
        out = (self.gen, self.leased - returned, returned)
        self.tokens = self.leased = 0
        self.gen = -1
        return out

    def idle(self, now: int, hold_us: int) -> bool:
        return (
            not self.busy
            and not self.queue
            and not self.leased
            and now >= self.short_until
            and now - self.seen_at > 4 * hold_us
        )


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
        self._counters: dict[tuple[str, bool], Any] = {}

    def key(self, action: str, identity: str) -> str:
        return f"{self.prefix}rl:{action}:{{{identity}}}"

    async def hit(self, action: str, identity: str, cost: int = 1) -> Decision:
        decision = await self._decide(self.key(action, identity), self.rates[action], cost)
        counter = self._counters.get((action, decision.allowed))
        if counter is None:  # the labelled child looked up once per action and outcome
            counter = self._counters[(action, decision.allowed)] = self.metrics.rate_limit.labels(
                action, "allowed" if decision.allowed else "limited"
            )
        counter.inc()
        return decision

    async def _decide(self, key: str, rate: Rate, cost: int) -> Decision:
        return self.local.hit(key, rate, cost)

    async def close(self) -> None:
        """Nothing to give back: every bucket is in this process."""

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

    Decisions of one bucket asked for at the same moment share one script call,
    and a large bucket is leased (see the module's docstring): ``lease`` tokens
    at most beyond the callers waiting (0: never), each spent within ``hold``
    seconds or given back; a bucket seen short refuses without a call for
    ``recheck`` seconds.
    """

    def __init__(
        self,
        redis: RedisContext,
        *,
        prefix: str = "chat:",
        metrics: Metrics | None = None,
        rates: dict[str, Rate],
        lease: int = 16,
        hold: float = 0.5,
        recheck: float = EMPTY_RECHECK,
        clock: Callable[[], int] | None = None,
    ) -> None:
        super().__init__(prefix=prefix, metrics=metrics, rates=rates)
        self.redis = redis.client
        # Skips Redis right after a failure (a context without a guard never skips).
        self.guard = redis.guard
        self._failing: set[str] = set()  # shards (guard.shard) whose buckets are local now
        # EVALSHA, and the script's body again after a NOSCRIPT (chat_gateway.redisio.script).
        self._script = Script(self.redis, SCRIPT)
        self._lease_script = Script(self.redis, LEASE_SCRIPT)
        # Decisions asked for at the same moment share one pipeline (chat_gateway.redisio.pipelined);
        # none on a cluster, where keys live on different nodes.
        self.batch = redis.batch
        self.lease = max(0, lease)
        self.hold_us = max(1000, round(hold * 1_000_000))
        self.recheck_us = round(recheck * 1_000_000)
        self._clock = clock or (lambda: time.monotonic_ns() // 1000)
        self._leases: dict[str, Lease] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._settling: set[asyncio.Task[None]] = set()

    async def _decide(self, key: str, rate: Rate, cost: int) -> Decision:
        shard = self.guard.shard(key)  # looked up once
        if not self.guard.shard_usable(shard):
            self._set_fallback(shard, True, "skipped: Redis failed moments ago")
            return self.local.hit(key, rate, cost)
        if cost != 1:
            return await self._exact(key, shard, rate, cost)
        st = self._leases.get(key)
        if st is None:
            st = self._leases[key] = Lease(rate=rate)
            if self._sweep is None:
                self._schedule_sweep()
        now = self._clock()
        pus = period_us(rate)
        left = st.spend(now)
        if left is not None:
            return _decide(rate, pus, st.seen + left * pus, pus, True)
        if now < st.short_until:  # seen short moments ago: refused without asking
            value = min(rate.capacity * pus, st.seen + (now - st.seen_at) * rate.capacity)
            return _decide(rate, pus, min(value, pus - 1), pus, False)
        return await self._take(key, shard, st, rate)

    async def _take(self, key: str, shard: str, st: Lease, rate: Rate) -> Decision:
        """The decision of one caller waiting for the bucket's next script call; the
        first caller makes it, the others join it, and whoever waited while it ran
        makes the next (handed over with a ``None``)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Decision | None] = loop.create_future()
        st.queue.append(fut)
        if st.busy:
            try:
                decision = await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled() and fut.result() is None:
                    self._hand_over(st)  # our turn, not taken: the next waiter's
                raise
            if decision is not None:
                return decision
            fut = loop.create_future()  # our turn: our decision comes from our call
            st.queue.insert(0, fut)
        else:
            st.busy = True
        try:
            await self._call(key, shard, st, rate)
        except asyncio.CancelledError:
            # Our caller is gone (its socket closed mid-call): our future, put back
            # in the queue, must not take the turn, or nobody would make the next
            # call and every later caller of the bucket would wait for ever.
            fut.cancel()
            raise
        finally:
            self._serve_queue(st, rate)
            self._hand_over(st)
        decision = fut.result()
        assert decision is not None
        return decision

    def _serve_queue(self, st: Lease, rate: Rate) -> None:
        """Callers that queued while the call ran, answered from the lease it brought."""
        if not st.tokens or not st.queue:
            return
        now = self._clock()
        pus = period_us(rate)
        waiting = st.queue
        while waiting and st.tokens:
            f = waiting.pop(0)
            if f.done():
                continue
            left = st.spend(now)
            if left is None:
                waiting.insert(0, f)
                return
            f.set_result(_decide(rate, pus, st.seen + left * pus, pus, True))

    @staticmethod
    def _hand_over(st: Lease) -> None:
        while st.queue:
            nxt = st.queue.pop(0)
            if not nxt.done():
                nxt.set_result(None)
                return
        st.busy = False

    async def _call(
        self, key: str, shard: str, st: Lease, rate: Rate, *, settle: bool = False
    ) -> None:
        """One script call: settle the current lease, take tokens for every caller
        queued (and, for a large bucket in demand, a few more on lease) and answer them."""
        batch = [f for f in st.queue if not f.done()]
        st.queue.clear()
        now = self._clock()
        pus = period_us(rate)
        prior, since = st.leased, now - st.seen_at
        gen, used, returned = st.settlement(now)
        if settle:
            extra = 0
        else:
            most = min(self.lease, rate.capacity // LEASE_SHARE)
            if returned:  # tokens went unspent: lease fewer
                st.extra = max(0, st.extra - returned)
            elif since < self.hold_us and (prior or batch):  # asked again soon: lease more
                st.extra = max(1, st.extra * 2)
            extra = st.extra = min(st.extra, most)
        deadline = now + self.hold_us * 9 // 10  # before Redis lets the lease lapse
        try:
            gd, ge, value, g = await self._lease_script(
                [key],
                [rate.capacity, pus, len(batch), extra, gen, used, returned, self.hold_us],
                batch=self.batch,
            )
        except asyncio.CancelledError:
            st.queue[:0] = batch
            raise
        except Exception as exc:
            self.guard.shard_failed(shard, exc)
            self._set_fallback(shard, True, exc)
            for f in batch:
                if not f.done():
                    f.set_result(self.local.hit(key, rate))
            return
        self._set_fallback(shard, False)
        gd, ge, value = int(gd), int(ge), int(value)
        after = self._clock()
        st.seen, st.seen_at = value, after
        if ge:
            st.tokens = st.leased = ge
            st.gen = int(g)
            st.deadline = deadline
        if gd < len(batch) or ge < extra:  # the bucket ran short
            next_token = -(-(pus - value) // rate.capacity)
            st.short_until = after + min(self.recheck_us, next_token)
        for i, f in enumerate(batch):
            if f.done():  # gone: a token taken for it is lost, never over-admitted
                continue
            if i < gd:
                f.set_result(_decide(rate, pus, value + (ge + gd - i - 1) * pus, pus, True))
            else:
                f.set_result(_decide(rate, pus, value, pus, False))

    async def _exact(self, key: str, shard: str, rate: Rate, cost: int) -> Decision:
        """A decision of several tokens at once, asked of Redis alone."""
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

    # -- leases given back in time, and forgotten buckets ------------------------------

    def _schedule_sweep(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._sweep = loop.call_later(self.hold_us / 2e6, self._swept)

    def _swept(self) -> None:
        self._sweep = None
        now = self._clock()
        for key, st in list(self._leases.items()):
            if st.leased and now >= st.deadline and not st.busy:
                self._spawn(self._settle(key, st))
            elif st.idle(now, self.hold_us):
                del self._leases[key]
        if self._leases:
            self._schedule_sweep()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, key: str, st: Lease) -> None:
        """Give the unspent tokens of a lease back (and declare the spent ones)."""
        if st.busy or not st.leased:
            return
        rate = st.rate
        if rate is None:
            return
        st.busy = True
        try:
            await self._call(key, self.guard.shard(key), st, rate, settle=True)
        finally:
            self._serve_queue(st, rate)
            self._hand_over(st)

    async def close(self) -> None:
        """Every lease settled, its unspent tokens back for the other instances."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for key, st in list(self._leases.items()):
            if st.leased:
                self._spawn(self._settle(key, st))
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

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
