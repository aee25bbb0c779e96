"""/readyz per dependency: the database behind a proxy the test cuts, the broker a
redis-server of the test's own that it stops; readiness returns without a restart.
Scrapes of /metrics reuse a probe round under a second old."""

from __future__ import annotations

import asyncio
import time

import httpx
import redis.asyncio as aioredis

from tests.harness import Instance, RedisServer, eventually, new_prefix, post
from tests.metrics_text import sample
from tests.proxy import tcp_proxy


async def test_readyz_follows_each_dependency_down_and_back(pg_url):
    redis = RedisServer()
    redis.start()
    inst = None
    try:
        async with tcp_proxy(pg_url) as (proxy, db_url):
            inst = Instance(
                {
                    "DATABASE_URL": db_url,
                    "REDIS_URL": redis.url,
                    "KEY_PREFIX": new_prefix(),
                    "LOG_LEVEL": "warning",
                    "BROKER_PROBE_INTERVAL": "0.5",
                    "DB_CONNECT_TIMEOUT": "1",
                    "DB_COMMAND_TIMEOUT": "1",
                }
            ).start()
            await inst.wait_ready()
            async with httpx.AsyncClient(base_url=inst.url, timeout=10) as http:

                async def ready(expect_status: int) -> dict | None:
                    r = await http.get("/readyz")
                    return r.json() if r.status_code == expect_status else None

                body = (await http.get("/readyz")).json()
                assert body["status"] == "ok"
                for name in ("database", "broker"):
                    assert body["checks"][name]["ok"] is True
                    assert isinstance(body["checks"][name]["latency_ms"], (int, float))

                proxy.cut()
                body = await eventually(lambda: ready(503))
                assert body["status"] == "unavailable"
                assert body["checks"]["database"]["ok"] is False
                assert body["checks"]["database"]["error"]
                assert body["checks"]["broker"]["ok"] is True
                assert (await http.get("/healthz")).status_code == 200, "liveness stays cheap"
                r = await post(http, inst.url, "lobby", "while the database is down")
                assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"

                proxy.restore()
                body = await eventually(lambda: ready(200), timeout=15)
                assert body["checks"]["database"]["ok"] is True
                assert (await post(http, inst.url, "lobby", "back")).status_code == 201

                redis.stop()
                body = await eventually(lambda: ready(503))
                assert body["checks"]["broker"]["ok"] is False
                assert body["checks"]["database"]["ok"] is True

                redis.start()
                await eventually(lambda: ready(200), timeout=15)
                text = (await http.get("/metrics")).text
                assert sample(text, "chat_broker_reconnects_total") >= 1
            assert inst.stop() == 0
    finally:
        if inst is not None:
            inst.stop()
        redis.stop()


async def test_scrapes_within_a_second_share_one_probe_round_and_readyz_probes_each_time(
    pg_url,
):
    """The broker's probe is a PING to a redis-server of the test's own, counted by
    Redis itself (INFO commandstats): scrapes of /metrics within a second of a probe
    round cost no PING, those that find none share one, /readyz probes every time,
    and chat_ready still follows the broker down and back."""
    redis = RedisServer()
    redis.start()
    inst = None
    try:
        inst = Instance(
            {
                "DATABASE_URL": pg_url,
                "REDIS_URL": redis.url,
                "KEY_PREFIX": new_prefix(),
                "LOG_LEVEL": "warning",
                # no PING down a quiet subscriber link while the test counts
                "BROKER_PROBE_INTERVAL": "3600",
            }
        ).start()
        await inst.wait_ready()
        counted = aioredis.from_url(redis.url)

        async def pings() -> int:
            stats = await counted.info("commandstats")
            return int(stats.get("cmdstat_ping", {}).get("calls", 0))

        async with counted, httpx.AsyncClient(base_url=inst.url, timeout=10) as http:

            async def scrape() -> float:
                r = await http.get("/metrics")
                assert r.status_code == 200
                return sample(r.text, "chat_ready")

            await asyncio.sleep(1.2)  # wait_ready's last /readyz is over a second old
            before = await pings()
            started = time.monotonic()
            ready = list(await asyncio.gather(*(scrape() for _ in range(10))))
            while time.monotonic() - started < 0.6:
                ready.append(await scrape())
            assert len(ready) > 10 and set(ready) == {1.0}
            assert await pings() - before == 1, "one probe round for every scrape in the second"

            before = await pings()
            for _ in range(3):
                assert (await http.get("/readyz")).status_code == 200
            assert await pings() - before == 3, "/readyz probes every time"

            await asyncio.sleep(1.2)
            before = await pings()
            assert await scrape() == 1.0
            assert await scrape() == 1.0
            assert await pings() - before == 1, "over a second old: a new round, then reused"

            async def ready_is(value: float) -> bool:
                return await scrape() == value

            redis.stop()
            await eventually(lambda: ready_is(0.0))
            redis.start()
            await eventually(lambda: ready_is(1.0), timeout=15)
        assert inst.stop() == 0
    finally:
        if inst is not None:
            inst.stop()
        redis.stop()
