"""The token bucket itself: exact arithmetic, the Lua script on a real Redis,
NOSCRIPT reload, and the per-instance fallback while Redis is down or hung."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as aioredis

from chat_gateway.access.ratelimit import LocalBuckets, RateLimiter, take
from chat_gateway.config import ConfigError, Rate, Settings
from chat_gateway.metrics import Metrics
from chat_gateway.redisio.context import RedisContext
from chat_gateway.redisio.guard import RedisGuard
from chat_gateway.redisio.pipelined import PipelinedConnection
from tests import harness
from tests.harness import RedisServer

SECOND = 1_000_000


# -- the arithmetic, on a clock the test holds ------------------------------------


def test_refill_is_exact_to_the_microsecond():
    cap, pus = 3, SECOND  # 3 per second: one token every 333333.33 µs
    value, ts = cap * pus, 0
    for _ in range(3):
        allowed, value, ts, _ = take(value, ts, 0, cap, pus, 1)
        assert allowed
    allowed, value, ts, _ = take(value, ts, 0, cap, pus, 1)
    assert not allowed and value == 0
    # 333333 µs refill 999999 units: one short of a token
    allowed, value, ts, _ = take(value, ts, 333_333, cap, pus, 1)
    assert not allowed and value == 999_999
    allowed, value, ts, _ = take(value, ts, 333_334, cap, pus, 1)
    assert allowed and value == 2
    # a long idle refills to the capacity and never past it
    allowed, value, ts, _ = take(value, ts, 3600 * SECOND, cap, pus, 1)
    assert allowed and value == (cap - 1) * pus


def test_admissions_over_time_equal_capacity_plus_rate_times_elapsed():
    # A client hammering every millisecond for 10 s at 3/s gets 3 + 30, exactly.
    cap, pus = 3, SECOND
    value, ts, admitted = cap * pus, 0, 0
    for now in range(0, 10 * SECOND + 1, 1000):
        allowed, value, ts, _ = take(value, ts, now, cap, pus, 1)
        admitted += allowed
    assert admitted == 3 + 30
    # ... and at 7/60s over 10 minutes: 7 + 70
    cap, pus = 7, 60 * SECOND
    value, ts, admitted = cap * pus, 0, 0
    for now in range(0, 600 * SECOND + 1, 10_000):
        allowed, value, ts, _ = take(value, ts, now, cap, pus, 1)
        admitted += allowed
    assert admitted == 7 + 70


def test_local_buckets_report_limit_remaining_reset_and_retry_after():
    now = [0]
    buckets = LocalBuckets(clock=lambda: now[0])
    rate = Rate(4, 2.0)  # a token every 0.5 s
    remaining = [buckets.hit("k", rate).remaining for _ in range(4)]
    assert remaining == [3, 2, 1, 0]
    refused = buckets.hit("k", rate)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(0.5)
    assert refused.reset == pytest.approx(2.0)
    assert refused.headers() == {
        "RateLimit-Limit": "4",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "2",
        "Retry-After": "1",
    }
    assert buckets.hit("other", rate).remaining == 3, "buckets are per key"
    now[0] = 500_000
    ok = buckets.hit("k", rate)
    assert ok.allowed and ok.remaining == 0 and "Retry-After" not in ok.headers()


def test_rates_too_large_for_exact_arithmetic_are_refused():
    with pytest.raises(ConfigError):
        Settings.from_env({"RATE_LIMIT": "100000000/24h"})
    with pytest.raises(ConfigError):
        Settings.from_env({"TRUSTED_PROXIES": "10.0.0.0/8,not-an-address"})
    assert Settings.from_env({"TRUSTED_PROXIES": "10.0.0.0/8, ::1"}).trusted_proxies == (
        "10.0.0.0/8",
        "::1",
    )


# -- the Lua script on a real Redis -------------------------------------------------


async def test_lua_script_does_the_same_arithmetic_on_redis_server_time(redis_prefix):
    client = aioredis.from_url(harness.REDIS_URL)
    try:
        rate = Rate(20, 60.0)
        pus = 60 * SECOND
        limiter = RateLimiter(RedisContext.of(client), prefix=redis_prefix, rates={"post": rate})
        key = limiter.key("post", "ana")
        cases = [
            (0, 10 * SECOND),  # empty, 10 s ago: 3.33 tokens refilled
            (5 * pus, 1),  # partly full, just now
            (0, 1000),  # empty, 1 ms ago: refused
            (19 * pus, 3600 * SECOND),
        ]  # long idle: clamped to the capacity
        for value, ago in cases:
            sec, usec = await client.time()
            before_ts = sec * SECOND + usec - ago
            await client.hset(key, mapping={"v": value, "t": before_ts})
            decision = await limiter.hit("post", "ana")
            stored = await client.hgetall(key)
            after_v, after_ts = int(stored[b"v"]), int(stored[b"t"])
            assert after_ts >= before_ts + ago
            expected = take(value, before_ts, after_ts, rate.capacity, pus, 1)
            assert (decision.allowed, after_v, after_ts) == expected[:3], (value, ago)
            assert decision.remaining == after_v // pus
        ttl = await client.pttl(key)
        assert 60_000 < ttl <= 61_000, "an idle bucket expires once it would be full again"
        assert not limiter.fallback
    finally:
        await client.aclose()


async def test_noscript_reloads_and_keeps_the_bucket():
    server = RedisServer()
    server.start()
    client = aioredis.from_url(server.url)
    try:
        metrics = Metrics()
        limiter = RateLimiter(
            RedisContext.of(client), prefix="t:", metrics=metrics, rates={"post": Rate(5, 3600.0)}
        )
        assert [(await limiter.hit("post", "ana")).remaining for _ in range(2)] == [4, 3]
        await client.script_flush()
        assert (await limiter.hit("post", "ana")).remaining == 2, "state survives a flush"
        await client.execute_command("SCRIPT", "FLUSH")
        assert (await limiter.hit("post", "ana")).remaining == 1
        assert not limiter.fallback
        assert metrics.rate_limit_fallback._value.get() == 0
        stats = await client.info("commandstats")
        # every decision went as EVALSHA (one round trip); the script body only
        # travelled in an EVAL after each NOSCRIPT (the first call's included)
        assert stats["cmdstat_evalsha"]["calls"] == 4
        assert stats["cmdstat_evalsha"]["failed_calls"] == 3
        assert stats["cmdstat_eval"]["calls"] == 3
        assert "cmdstat_script|load" not in stats
    finally:
        await client.aclose()
        server.stop()


async def test_concurrent_decisions_share_pipelines_and_stay_exact():
    """Hits asked for at once go out together (one connection, not one each); each is
    still its own atomic decision, in order, and exact right after Redis lost the script."""
    server = RedisServer()
    server.start()
    client = aioredis.from_url(server.url)
    try:
        limiter = RateLimiter(
            RedisContext.of(client, batch=PipelinedConnection(client)),
            prefix="t:",
            rates={"post": Rate(20, 3600.0)},
        )
        assert (await limiter.hit("post", "ana")).remaining == 19  # loads the script
        before = (await client.info("stats"))["total_connections_received"]
        first = await asyncio.gather(*(limiter.hit("post", "ana") for _ in range(10)))
        assert [d.remaining for d in first] == list(range(18, 8, -1))
        grown = (await client.info("stats"))["total_connections_received"] - before
        assert grown <= 1, "ten calls, one pipelined connection"
        await client.script_flush()
        rest = await asyncio.gather(*(limiter.hit("post", "ana") for _ in range(15)))
        assert sum(d.allowed for d in rest) == 9
        assert sorted(d.remaining for d in rest if d.allowed) == list(range(9))
        assert not limiter.fallback
    finally:
        await client.aclose()
        server.stop()


# -- Redis outage: per-instance buckets, a metric and a log line -----------------------


async def test_redis_outage_falls_back_to_local_buckets_and_recovers(caplog):
    server = RedisServer()
    server.start()
    client = aioredis.from_url(server.url, socket_connect_timeout=0.5)
    metrics = Metrics()
    limiter = RateLimiter(
        RedisContext.of(client, guard=RedisGuard(cooldown=0.0)),
        prefix="t:",
        metrics=metrics,
        rates={"post": Rate(3, 3600.0)},
    )
    caplog.set_level(logging.WARNING, logger="gateway.ratelimit")
    try:
        assert (await limiter.hit("post", "ana")).remaining == 2
        server.stop()
        during = [await limiter.hit("post", "ana") for _ in range(8)]
        # neither a flood let through nor everyone blocked: the local bucket's capacity
        assert [d.allowed for d in during] == [True] * 3 + [False] * 5
        assert limiter.fallback
        assert metrics.rate_limit_fallback._value.get() == 1
        assert b"chat_rate_limit_local_fallback 1.0" in metrics.render()
        assert any("per-instance buckets" in r.getMessage() for r in caplog.records)

        server.start()  # same port, empty: the shared bucket starts full again
        await harness.eventually(lambda: limiter.hit("post", "ana"), timeout=10)
        assert not limiter.fallback
        assert metrics.rate_limit_fallback._value.get() == 0
        assert any("shared buckets restored" in r.getMessage() for r in caplog.records)
    finally:
        await client.aclose()
        server.stop()


async def test_a_hung_redis_costs_one_timeout_then_local_buckets_for_the_cooldown():
    # A listener that accepts and never answers: Redis stuck, not down.
    accepted = []

    async def black_hole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        try:
            while await reader.read(1 << 16):  # read everything, answer nothing
                pass
        finally:
            writer.close()

    hole = await asyncio.start_server(black_hole, "127.0.0.1", 0)
    port = hole.sockets[0].getsockname()[1]
    client = aioredis.from_url(f"redis://127.0.0.1:{port}/0", socket_timeout=0.3)
    metrics = Metrics()
    limiter = RateLimiter(
        RedisContext.of(client, guard=RedisGuard(cooldown=3600.0)),
        prefix="t:",
        metrics=metrics,
        rates={"post": Rate(2, 60.0)},
    )
    try:
        first = await limiter.hit("post", "ana")
        assert first.allowed and limiter.fallback
        attempts = len(accepted)
        assert attempts >= 1
        rest = [await limiter.hit("post", "ana") for _ in range(3)]
        assert [d.allowed for d in rest] == [True, False, False]
        # Redis is not tried again within the guard's cooldown
        assert len(accepted) == attempts
        assert metrics.rate_limit_fallback._value.get() == 1
    finally:
        await client.aclose()
        for writer in accepted:
            writer.close()
        hole.close()
        await hole.wait_closed()
