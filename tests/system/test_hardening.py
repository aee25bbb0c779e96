"""Small holes a hostile client found, each closed: what it sent, and what it gets now."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import jwt
import orjson
import pytest
import websockets

from tests.harness import WSClient, instances, post, t


def embedded(tmp_path, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
        "REDIS_URL": "memory://",
        "LOG_LEVEL": "info",
        "RATE_LIMIT": "100000/1s",
        "CONNECT_RATE_LIMIT": "100000/1s",
        **extra,
    }


def log_lines(text: str) -> list[dict]:
    return [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]


def no_errors(text: str) -> None:
    bad = [line for line in log_lines(text) if line["level"] in ("error", "critical")]
    assert not bad, bad


async def test_a_client_aborting_its_post_body_is_no_error(tmp_path):
    async with instances(1, embedded(tmp_path)) as (gw,):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", gw.port), timeout=t(10)) as s:
                s.sendall(
                    b"POST /v1/rooms/r/messages HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                    b'{"text": "half'
                )
                await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
        assert "POST /v1/rooms/r/messages" in gw.log()
        no_errors(gw.log())


SECRET = "hardening-test-secret-of-at-least-32-bytes"


def token(sub: str = "ana") -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def nested(depth: int) -> dict:
    data: dict = {}
    inner = data
    for _ in range(depth - 1):
        inner["a"] = {}
        inner = inner["a"]
    return data


async def test_publish_data_nested_too_deep_is_a_422(tmp_path):
    async with instances(1, embedded(tmp_path)) as (gw,), httpx.AsyncClient() as http:
        for depth in (33, 254, 300):
            body = (
                b'{"room":"r","event":"e","data":'
                + b'{"a":' * (depth - 1)
                + b"{}"
                + b"}" * (depth - 1)
                + b"}"
            )
            r = await http.post(
                f"{gw.url}/v1/publish", content=body, headers={"Content-Type": "application/json"}
            )
            assert r.status_code == 422, (depth, r.text)
            assert r.json()["error"]["field"] == "data" and r.json()["error"]["limit"] == 32
        r = await http.post(
            f"{gw.url}/v1/publish", json={"room": "r", "event": "e", "data": nested(32)}
        )
        assert r.status_code == 202, r.text
        no_errors(gw.log())


async def test_refused_upgrades_are_answers_not_errors_and_tokens_stay_out_of_logs(tmp_path):
    env = embedded(tmp_path, AUTH_SECRET=SECRET)
    async with instances(1, env) as (gw,):
        for url in (gw.ws_url, f"{gw.ws_url}?token=forged", f"{gw.ws_url}?bogus=1"):
            with pytest.raises(websockets.InvalidStatus) as refused:
                async with WSClient.connect(url):
                    pass
            assert refused.value.response.status_code in (401, 422)
            assert orjson.loads(refused.value.response.body)["error"]["code"]
        # the server reads ?%74oken= as ?token=: so must the log redaction
        secret = token()
        async with WSClient.connect(f"{gw.ws_url}?%74oken={secret}") as ws:
            await ws.send({"type": "ping"})
            assert await ws.expect("pong") == {"type": "pong"}
        await asyncio.sleep(0.3)
        log = gw.log()
        assert "without completing handshake" not in log
        no_errors(log)
        assert "[redacted]" in log
        assert secret not in log and secret.split(".")[2] not in log


async def test_text_logs_cannot_be_forged_through_a_path(tmp_path):
    env = embedded(tmp_path, LOG_FORMAT="text")
    async with instances(1, env) as (gw,), httpx.AsyncClient() as http:
        forged = "/x%0D%0A2026-01-01 00:00:00,000 ERROR gateway.http FORGED-LINE"
        r = await http.get(gw.url + forged)
        assert r.status_code == 404
        r = await http.get(f"{gw.url}/v1/rooms/r/events?%74oken=sekrit&since=x")
        assert r.status_code == 422
    lines = gw.log().splitlines()
    assert "sekrit" not in gw.log()
    assert not [line for line in lines if line.startswith("2026-01-01")], lines
    assert any("FORGED-LINE" in line and "\\x0a" in line for line in lines), lines


async def test_pages_send_security_headers_and_slashes_never_redirect(tmp_path):
    async with instances(1, embedded(tmp_path)) as (gw,), httpx.AsyncClient() as http:
        for path in ("/", "/dashboard"):
            r = await http.get(gw.url + path)
            assert r.status_code == 200
            csp = r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
            assert r.headers["x-frame-options"] == "DENY"
        for path in ("/healthz/", "/v1/rooms/r/messages/", "/dashboard/"):
            r = await http.get(gw.url + path, headers={"Host": "evil.example"})
            assert r.status_code == 404, (path, r.status_code)
            assert "location" not in r.headers
            assert r.json()["error"]["code"] == "not_found"


async def test_since_in_a_frame_must_be_a_number(tmp_path):
    async with (
        instances(1, embedded(tmp_path)) as (gw,),
        WSClient.connect(gw.ws_url) as ws,
        httpx.AsyncClient() as http,
    ):
        for i in range(3):
            await post(http, gw.url, "r", f"m{i}")
        for bad in ("5", "0", True, -1, 1.5):
            await ws.send({"type": "subscribe", "room": "r", "since": bad})
            err = await ws.expect("error")
            assert err["code"] == "invalid_request" and err["field"] == "since", (bad, err)
        assert (await ws.subscribe("r", since=1))["seq"] == 3
        assert await ws.messages("r", 2) == [2, 3]


async def test_the_user_parameter_is_checked_in_auth_mode_too(tmp_path):
    async with (
        instances(1, embedded(tmp_path, AUTH_SECRET=SECRET)) as (gw,),
        httpx.AsyncClient() as http,
    ):
        headers = {"Authorization": f"Bearer {token()}"}
        r = await http.get(f"{gw.url}/v1/rooms/r/events", params={"user": ""}, headers=headers)
        assert r.status_code == 422 and r.json()["error"]["field"] == "author", r.text
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with WSClient.connect(f"{gw.ws_url}?token={token()}&user=%20"):
                pass
        assert refused.value.response.status_code == 422
