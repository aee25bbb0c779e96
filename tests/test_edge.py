"""Edges a hostile client or a careless deployment found, each closed on a real gateway."""

from __future__ import annotations

import base64
import os
import sqlite3
import time
from pathlib import Path

import httpx
import jwt
import pytest
import redis.asyncio as aioredis

from chat_gateway.access.auth import key_bucket
from chat_gateway.config import ConfigError, Settings
from chat_gateway.webhooks.egress import refused
from tests.harness import Instance, RedisServer, WSClient, eventually, instances, post, t
from tests.test_hardening import embedded, log_lines

# -- pages under /static and /sdk ---------------------------------------------------


async def test_every_static_file_and_the_sdk_refuse_framing_and_sniffing(tmp_path):
    async with instances(1, embedded(tmp_path)) as (gw,), httpx.AsyncClient() as http:
        for path in (
            "/static/index.html",
            "/static/dashboard.html",
            "/static/chat.js",
            "/sdk/chat-gateway.js",
        ):
            r = await http.get(gw.url + path)
            assert r.status_code == 200, path
            csp = r.headers.get("content-security-policy", "")
            assert "frame-ancestors 'none'" in csp, path
            assert r.headers.get("x-frame-options") == "DENY", path
            assert r.headers.get("x-content-type-options") == "nosniff", path
            assert r.headers.get("referrer-policy") == "no-referrer", path


# -- webhook egress: IPv4 inside IPv6 ------------------------------------------------

# Each is a private, loopback or metadata IPv4 address written as IPv6.
EMBEDDED_PRIVATE = (
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "2002:a00:1::1",  # 6to4 of 10.0.0.1
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "::127.0.0.1",  # IPv4-compatible
    "::10.1.2.3",
    "::ffff:0:127.0.0.1",  # IPv4-translated
    "::ffff:0:c0a8:1",  # IPv4-translated 192.168.0.1
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1
    "64:ff9b:1::a00:1",  # local-use NAT64 (RFC 8215)
    "::ffff:127.0.0.1",  # IPv4-mapped (refused before too)
)


def test_ipv6_forms_of_private_ipv4_addresses_are_refused():
    assert [a for a in EMBEDDED_PRIVATE if not refused(a)] == []
    # the same forms of a public address stay allowed, as do plain public ones
    for public in ("64:ff9b::808:808", "2002:808:808::1", "::8.8.8.8", "2606:4700::1111"):
        assert not refused(public), public


def test_a_receiver_url_with_an_embedded_private_address_is_refused_at_start(tmp_path):
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    for address in EMBEDDED_PRIVATE:
        with pytest.raises(ConfigError, match="WEBHOOK_ALLOW_PRIVATE"):
            Settings(
                webhook_urls=(f"http://[{address}]:8080/in",), webhook_secret=secret
            ).validated()
    env = embedded(tmp_path, WEBHOOK_URLS="http://[64:ff9b::7f00:1]:8080/in", WEBHOOK_SECRET=secret)
    gw = Instance(env).start()
    assert gw.proc is not None
    try:
        assert gw.proc.wait(t(30)) != 0
    finally:
        gw.kill()
    assert "WEBHOOK_ALLOW_PRIVATE" in gw.log()


# -- /metrics: who may scrape it, and what it says of webhook receivers ---------------


async def test_metrics_need_a_key_with_auth_on_or_metrics_key_set(tmp_path):
    auth = embedded(
        tmp_path, AUTH_SECRET="s" * 40, API_KEYS="backend-key", METRICS_KEY="scrape-key"
    )
    no_metrics_key = embedded(tmp_path, AUTH_SECRET="s" * 40, API_KEYS="backend-key")
    open_with_key = embedded(tmp_path, METRICS_KEY="scrape-key")
    nothing = embedded(tmp_path, AUTH_SECRET="s" * 40)

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
        async with instances(1, embedded(tmp_path)) as (gw,):  # open mode: open
            assert (await http.get(gw.url + "/metrics")).status_code == 200


async def test_webhook_series_and_logs_name_a_receiver_by_id_and_host_only(tmp_path):
    from tests.test_webhooks import Receiver, new_secret

    receiver = await Receiver([new_secret()], answer=lambda hit: (410, {}, 0.0)).start()
    secret_path = "/services/T0001/B0002/PathSecretXyz"
    url = f"http://127.0.0.1:{receiver.port}{secret_path}?token=QuerySecretXyz"
    env = embedded(
        tmp_path,
        WEBHOOK_URLS=url,
        WEBHOOK_SECRET=" ".join(receiver.secrets),
        WEBHOOK_ALLOW_PRIVATE="true",
        WEBHOOK_POLL_INTERVAL="0.1",
        API_KEYS="admin-key",
    )
    admin = {"Authorization": "Bearer admin-key"}
    try:
        async with instances(1, env) as (gw,), httpx.AsyncClient(base_url=gw.url) as http:
            r = await http.post("/v1/rooms/hooked/messages", json={"text": "hi", "author": "a"})
            assert r.status_code == 201

            async def disabled() -> bool:
                r = await http.get("/v1/admin/webhooks", headers=admin)
                return r.json()["endpoints"][0]["state"] == "disabled"

            await eventually(disabled)
            listed = (await http.get("/v1/admin/webhooks", headers=admin)).json()
            endpoint = listed["endpoints"][0]
            assert endpoint["url"] == url  # the admin surface shows the URL in full
            text = (await http.get("/metrics")).text
            label = f'endpoint="{endpoint["id"]}:127.0.0.1:{receiver.port}"'
            assert f'chat_webhook_attempts_total{{{label},outcome="gone"}} 1.0' in text
            assert "PathSecretXyz" not in text and "QuerySecretXyz" not in text
            await eventually(lambda: "410 Gone" in gw.log())
        log = gw.log()
        assert "PathSecretXyz" not in log and "QuerySecretXyz" not in log
        assert f"{endpoint['id']}:127.0.0.1:{receiver.port}" in log
    finally:
        await receiver.stop()


# -- smaller holes: rate limits, buckets, queries ----------------------------------------


async def test_marking_read_is_rate_limited_on_http_and_ws(tmp_path):
    env = embedded(tmp_path, READ_RATE_LIMIT="3/60s")
    async with (
        instances(1, env) as (gw,),
        httpx.AsyncClient(base_url=gw.url) as http,
    ):
        assert (await post(http, gw.url, "seen", "hi", author="ana")).status_code == 201
        for _ in range(3):
            r = await http.post("/v1/rooms/seen/read", json={"seq": 1, "user": "ana"})
            assert r.status_code == 200 and r.headers["ratelimit-limit"] == "3"
        r = await http.post("/v1/rooms/seen/read", json={"seq": 1, "user": "ana"})
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        async with WSClient.connect(gw.ws_url + "?user=ana") as ws:
            await ws.send({"type": "read", "room": "seen", "seq": 1, "ref": "r1"})
            err = await ws.expect("error")
            assert err["code"] == "rate_limited" and err.get("ref") == "r1"


async def test_typing_frames_cost_redis_one_set_per_window(tmp_path):
    redis = RedisServer()
    redis.start()
    try:
        env = embedded(tmp_path, REDIS_URL=redis.url, KEY_PREFIX="typing:")
        async with (
            instances(1, env) as (gw,),
            WSClient.connect(gw.ws_url + "?user=ana") as ws,
        ):
            await ws.subscribe("typed")

            async def sets() -> int:
                async with aioredis.from_url(redis.url) as client:
                    stats = await client.info("commandstats")
                return int(stats.get("cmdstat_set", {}).get("calls", 0))

            before = await sets()
            for _ in range(50):
                await ws.send({"type": "typing", "room": "typed"})
            await ws.send({"type": "ping", "ref": "after"})
            await ws.expect("pong")
            assert await sets() - before <= 1
    finally:
        redis.stop()


async def test_a_user_named_like_an_api_key_has_a_bucket_of_its_own(tmp_path):
    secret = "s" * 40
    env = embedded(tmp_path, AUTH_SECRET=secret, API_KEYS="backend-key", RATE_LIMIT="2/60s")
    lookalike = key_bucket("backend-key")

    def token(sub: str) -> dict[str, str]:
        tok = jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, secret, algorithm="HS256")
        return {"Authorization": f"Bearer {tok}"}

    async with instances(1, env) as (gw,), httpx.AsyncClient(base_url=gw.url) as http:
        r = await http.post("/v1/rooms/b/messages", json={"text": "one"}, headers=token("bob"))
        assert r.status_code == 201
        key = {"Authorization": "Bearer backend-key"}
        for i in range(2):  # the key's post bucket, emptied by edits
            r = await http.patch("/v1/rooms/b/messages/1", json={"text": f"e{i}"}, headers=key)
            assert r.status_code == 200
        r = await http.patch("/v1/rooms/b/messages/1", json={"text": "e3"}, headers=key)
        assert r.status_code == 429
        r = await http.post("/v1/rooms/b/messages", json={"text": "me"}, headers=token(lookalike))
        assert r.status_code == 201, r.text


async def test_read_positions_are_filtered_before_their_limit(tmp_path):
    secret = "s" * 40
    env = embedded(tmp_path, AUTH_SECRET=secret, READ_RATE_LIMIT="100/1s")
    tok = jwt.encode(
        {"sub": "ana", "exp": int(time.time()) + 600, "rooms": ["zz-*", "mine"]},
        secret,
        algorithm="HS256",
    )
    auth = {"Authorization": f"Bearer {tok}"}
    async with instances(1, env) as (gw,), httpx.AsyncClient(base_url=gw.url) as http:
        for room in ("zz-granted", "mine"):
            assert (
                await http.post(f"/v1/rooms/{room}/messages", json={"text": "x"}, headers=auth)
            ).status_code == 201
            r = await http.post(f"/v1/rooms/{room}/read", json={"seq": 1}, headers=auth)
            assert r.status_code == 200
        # 1,000 positions in rooms the token does not grant, all sorting first
        with sqlite3.connect(tmp_path / "x.db") as db:
            db.executemany(
                "INSERT INTO read_positions (user_name, room, seq, updated_ms) VALUES (?, ?, 1, 0)",
                [("ana", f"aa-{i:04d}") for i in range(1000)],
            )
        r = await http.get("/v1/read", headers=auth)
        assert r.status_code == 200
        assert [p["room"] for p in r.json()["rooms"]] == ["mine", "zz-granted"]


async def test_the_store_filters_read_positions_by_name_and_prefix(store):
    from chat_gateway.storage import RoomFilter

    for room in ("a-1", "b-1", "b-2", "c", "c-1"):
        await store.append(room, "ana", "x")
        await store.mark_read("ana", room, 1)
    keep = RoomFilter(names=("c",), prefixes=("b-",))
    got = await store.read_positions("ana", limit=2, rooms=keep)
    assert [p.room for p in got] == ["b-1", "b-2"]
    got = await store.read_positions("ana", rooms=keep)
    assert [p.room for p in got] == ["b-1", "b-2", "c"]
    got = await store.read_positions("ana", rooms=RoomFilter(prefixes=("b_",)))
    assert got == []  # a prefix is text, not a LIKE pattern
    assert len(await store.read_positions("ana")) == 5


async def test_ws_over_plain_http_checks_its_query_before_asking_for_an_upgrade(tmp_path):
    async with instances(1, embedded(tmp_path)) as (gw,), httpx.AsyncClient() as http:
        for query in ("?user=" + "a" * 500, "?nope=1"):
            r = await http.get(gw.url + "/v1/ws" + query)
            assert r.status_code == 422, (query, r.status_code)
            assert r.json()["error"]["code"] == "invalid_request"
        r = await http.get(gw.url + "/v1/ws?user=ana")
        assert r.status_code == 426


# -- logs ---------------------------------------------------------------------------


async def test_a_websocket_is_one_line_open_one_line_closed_and_no_text_or_query(tmp_path):
    env = embedded(tmp_path, LOG_LEVEL="debug")
    async with instances(1, env) as (gw,):
        async with WSClient.connect(gw.ws_url + "?user=ana-query-name") as ws:
            await ws.subscribe("logged")
            await ws.send({"type": "publish", "room": "logged", "text": "SECRET-TEXT", "ref": 1})
            await ws.expect("ack")
        await eventually(lambda: "websocket closed" in gw.log())
    text = Path(gw.log_path).read_text()
    assert "SECRET-TEXT" not in text and "ana-query-name" not in text
    lines = log_lines(text)
    (opened,) = [line for line in lines if line["msg"] == "websocket opened"]
    of_it = [
        line for line in lines if line.get("conn") == opened["conn"] and line["level"] != "debug"
    ]
    assert [line["msg"] for line in of_it] == ["websocket opened", "websocket closed"]
    closed = of_it[1]
    assert closed["close_code"] == 1000 and closed["closed_by"] == "client"


async def test_the_start_line_names_the_database_file_and_the_broker_without_passwords(
    tmp_path, pg_url
):
    redis = RedisServer(extra_args=("--requirepass", "hunter2-redis"))
    redis.start()
    try:
        env = embedded(tmp_path, DATABASE_URL="sqlite:///relative.db")
        gw = Instance(env, cwd=str(tmp_path)).start()
        try:
            await gw.wait_ready()
        finally:
            gw.stop()
        assert f"SQLite file {tmp_path / 'relative.db'}" in gw.log()

        with_password = pg_url.replace(
            "postgresql://postgres@", "postgresql://postgres:hunter2-pg@"
        )
        env = embedded(
            tmp_path,
            DATABASE_URL=with_password,
            REDIS_URL=f"redis://:hunter2-redis@127.0.0.1:{redis.port}/0",
        )
        async with instances(1, env) as (gw,):
            pass
        text = Path(gw.log_path).read_text()
        (start,) = [line for line in log_lines(text) if "database" in line]
        assert start["database"] == "Postgres at " + pg_url.replace("postgres@", "postgres:***@")
        assert start["broker"] == f"redis://:***@127.0.0.1:{redis.port}/0"
        assert "hunter2" not in text
    finally:
        redis.stop()


def test_help_lists_the_new_variables():
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "chat_gateway", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("METRICS_KEY", "AUTH_JWKS_ALLOW_HTTP", "READ_RATE_LIMIT"):
        assert name in out, name
