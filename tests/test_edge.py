"""Edges a hostile client or a careless deployment found, each closed on a real gateway."""

from __future__ import annotations

import base64
import os

import httpx
import pytest

from chat_gateway.config import ConfigError, Settings
from chat_gateway.webhooks.egress import refused
from tests.harness import Instance, instances


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
    assert gw.proc.wait(30) != 0
    assert "WEBHOOK_ALLOW_PRIVATE" in gw.log()
