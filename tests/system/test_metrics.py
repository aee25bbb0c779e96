"""/metrics moves with real traffic on a real gateway process."""

from __future__ import annotations

import httpx

from tests.harness import (
    SSEClient,
    WSClient,
    embedded_env,
    eventually,
    instances,
    post,
)
from tests.metrics_text import sample


async def scrape(http: httpx.AsyncClient, base: str) -> str:
    r = await http.get(f"{base}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


async def test_counters_follow_connections_messages_cache_and_rate_limits(gateway_env):
    env = {**gateway_env, "RATE_LIMIT": "3/60s"}
    room = "metered"
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        before = await scrape(http, gw.url)
        assert sample(before, "chat_connections", transport="ws") == 0
        assert sample(before, "chat_messages_accepted_total", transport="http") == 0
        async with (
            WSClient.connect(gw.ws_url) as ws,
            SSEClient.open(f"{gw.url}/v1/rooms/{room}/events") as sse,
        ):
            await ws.subscribe(room)
            text = await scrape(http, gw.url)
            assert sample(text, "chat_connections", transport="ws") == 1
            assert sample(text, "chat_connections", transport="sse") == 1
            assert sample(text, "chat_subscriptions") == 2

            for i in range(3):
                assert (await post(http, gw.url, room, f"m{i}")).status_code == 201
            refused = await post(http, gw.url, room, "one too many")
            assert refused.status_code == 429
            assert await ws.messages(room, 3) == [1, 2, 3]
            assert await sse.wait_for(3) == [1, 2, 3]
            for _ in range(2):
                assert (await http.get(f"{gw.url}/v1/rooms/{room}/messages")).status_code == 200

            text = await scrape(http, gw.url)
            assert sample(text, "chat_messages_accepted_total", transport="http") == 3
            assert sample(text, "chat_messages_delivered_total") == 6
            assert sample(text, "chat_delivery_latency_seconds_count") == 3  # one per message
            assert (
                sample(text, "chat_rate_limit_decisions_total", action="post", decision="allowed")
                == 3
            )
            assert (
                sample(text, "chat_rate_limit_decisions_total", action="post", decision="limited")
                == 1
            )
            assert sample(text, "chat_history_cache_total", outcome="miss") >= 1
            assert sample(text, "chat_history_cache_total", outcome="hit") >= 1
            assert sample(text, "chat_db_pool_size") >= 1
            assert "chat_db_pool_in_use" in text
        # both clients gone: the gauges come back down
        await eventually(lambda: _gauges_zero(http, gw.url))


async def _gauges_zero(http: httpx.AsyncClient, base: str) -> bool:
    text = await scrape(http, base)
    return (
        sample(text, "chat_connections", transport="ws") == 0
        and sample(text, "chat_connections", transport="sse") == 0
        and sample(text, "chat_subscriptions") == 0
    )


async def test_metrics_need_a_key_with_auth_on_or_metrics_key_set(tmp_path):
    auth = embedded_env(
        tmp_path, AUTH_SECRET="s" * 40, API_KEYS="backend-key", METRICS_KEY="scrape-key"
    )
    no_metrics_key = embedded_env(tmp_path, AUTH_SECRET="s" * 40, API_KEYS="backend-key")
    open_with_key = embedded_env(tmp_path, METRICS_KEY="scrape-key")
    nothing = embedded_env(tmp_path, AUTH_SECRET="s" * 40)

    def bearer(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    async with httpx.AsyncClient() as http:
        async with instances(1, auth) as (gw,):
            for headers in ({}, bearer("wrong"), bearer("s" * 40)):
                r = await http.get(gw.url + "/metrics", headers=headers)
                assert r.status_code == 401, headers
                assert r.json()["error"]["code"] == "unauthorized"
            for key in ("scrape-key", "backend-key"):
                r = await http.get(gw.url + "/metrics", headers=bearer(key))
                assert r.status_code == 200 and "chat_connections" in r.text
        async with instances(1, no_metrics_key) as (gw,):
            assert (await http.get(gw.url + "/metrics")).status_code == 401
            r = await http.get(gw.url + "/metrics", headers=bearer("backend-key"))
            assert r.status_code == 200
        async with instances(1, open_with_key) as (gw,):
            assert (await http.get(gw.url + "/metrics")).status_code == 401
            r = await http.get(gw.url + "/metrics", headers=bearer("scrape-key"))
            assert r.status_code == 200
        async with instances(1, nothing) as (gw,):
            r = await http.get(gw.url + "/metrics")
            assert r.status_code == 401 and "METRICS_KEY" in r.json()["error"]["message"]
        async with instances(1, embedded_env(tmp_path)) as (gw,):  # open mode: open
            assert (await http.get(gw.url + "/metrics")).status_code == 200
