"""Edges a hostile client or a careless deployment found, each closed on a real gateway."""

from __future__ import annotations

import httpx

from tests.harness import instances


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
