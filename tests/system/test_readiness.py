"""/readyz per dependency: the database behind a proxy the test cuts, the broker a
redis-server of the test's own that it stops; readiness returns without a restart."""

from __future__ import annotations

import httpx

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
