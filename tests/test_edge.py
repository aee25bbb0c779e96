"""Edges a hostile client or a careless deployment found, each closed on a real gateway."""

from __future__ import annotations

import base64
import os

import httpx
import pytest

from chat_gateway.config import ConfigError, Settings
from chat_gateway.webhooks.egress import refused
from tests.harness import Instance, eventually, instances, t


def embedded(tmp_path, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
        "REDIS_URL": "memory://",
        "LOG_LEVEL": "info",
        "RATE_LIMIT": "100000/1s",
        "CONNECT_RATE_LIMIT": "100000/1s",
        **extra,
    }


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
