"""The token bucket's arithmetic (chat_gateway.access.ratelimit), on a clock the test holds:
exact refill, admissions over time, the local buckets' headers, rates refused."""

from __future__ import annotations

import pytest

from chat_gateway.access.ratelimit import (
    POST,
    Lease,
    LocalBuckets,
    post_action,
    rates_of,
    take,
)
from chat_gateway.config import ConfigError, Rate, Settings

SECOND = 1_000_000


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


def test_a_namespace_rate_limit_is_a_bucket_of_its_own(tmp_path) -> None:
    path = tmp_path / "ns.toml"
    path.write_text(
        '[namespaces.slow]\nrate_limit = "2/1h"\n[namespaces.live]\nkind = "ephemeral"\n'
    )
    settings = Settings.from_env({"NAMESPACES_FILE": str(path)})
    rates = rates_of(settings)
    ns = settings.namespaces_file
    assert post_action(ns.of("slow:a")) == "post@slow" and rates["post@slow"] == Rate(2, 3600.0)
    assert post_action(ns.of("live:a")) == POST == post_action(ns.of("lobby"))
    assert rates[POST] == settings.rate_limit


def test_a_lease_is_spent_until_its_deadline_then_settled_as_used_and_returned():
    lease = Lease(tokens=3, leased=3, gen=7, deadline=1_000)
    assert [lease.spend(10), lease.spend(20)] == [2, 1], "the tokens left after each"
    assert lease.spend(1_000) is None, "nothing is spent at or past the deadline"
    assert lease.tokens == 1
    # two spent, one back to the bucket, for the lease of generation 7
    assert lease.settlement(1_000) == (7, 2, 1)
    assert (lease.tokens, lease.leased, lease.gen) == (0, 0, -1)
    assert lease.settlement(1_001) == (-1, 0, 0), "nothing on lease: nothing to settle"
    assert lease.spend(10) is None


def test_a_bucket_is_forgotten_only_when_nothing_is_on_lease_or_waiting():
    hold = 500_000
    lease = Lease(seen_at=0)
    assert not lease.idle(4 * hold, hold), "answered recently"
    assert lease.idle(4 * hold + 1, hold)
    assert not Lease(seen_at=0, leased=1, tokens=1).idle(10 * hold, hold)
    assert not Lease(seen_at=0, busy=True).idle(10 * hold, hold)
    assert not Lease(seen_at=0, short_until=20 * hold).idle(10 * hold, hold)
