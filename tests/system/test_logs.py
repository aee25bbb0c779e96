"""Connection limits refused before the upgrade; JSON log lines with ids and no secrets."""

from __future__ import annotations

import time
from contextlib import AsyncExitStack

import httpx
import jwt
import orjson
import pytest
import websockets

from tests.harness import Instance, SSEClient, WSClient, eventually, instances

SECRET = "limits-test-secret-of-at-least-32-bytes"


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


async def refused(url: str) -> tuple[int, dict]:
    with pytest.raises(websockets.InvalidStatus) as exc:
        async with WSClient.connect(url):
            pass
    response = exc.value.response
    return response.status_code, orjson.loads(response.body)


async def test_limits_per_identity_and_per_instance(tmp_path):
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/l.db",
        "REDIS_URL": "memory://",
        "AUTH_SECRET": SECRET,
        "LOG_LEVEL": "warning",
        "MAX_CONNECTIONS": "3",
        "MAX_CONNECTIONS_PER_IDENTITY": "2",
    }
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        ana, bob = token("ana"), token("bob")
        async with AsyncExitStack() as stack:
            first = await stack.enter_async_context(WSClient.connect(f"{gw.ws_url}?token={ana}"))
            await stack.enter_async_context(
                SSEClient.open(f"{gw.url}/v1/rooms/r/events", {"Authorization": f"Bearer {ana}"})
            )
            status, body = await refused(f"{gw.ws_url}?token={ana}")
            assert status == 429 and body["error"]["code"] == "too_many_connections"
            r = await http.get(f"{gw.url}/v1/rooms/r/events?token={ana}")
            assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_connections"

            await stack.enter_async_context(WSClient.connect(f"{gw.ws_url}?token={bob}"))
            status, body = await refused(f"{gw.ws_url}?token={bob}")
            assert status == 503 and body["error"]["code"] == "unavailable"

            # the refused attempts left nothing behind: closing one frees one place
            await first.conn.close()

            async def admitted() -> bool:
                try:
                    async with WSClient.connect(f"{gw.ws_url}?token={bob}") as ws:
                        await ws.send({"type": "ping"})
                        return (await ws.expect("pong"))["type"] == "pong"
                except websockets.InvalidStatus:
                    return False

            assert await eventually(admitted)


async def test_logs_are_json_lines_with_ids_and_no_text_or_token(tmp_path):
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/g.db",
        "REDIS_URL": "memory://",
        "AUTH_SECRET": SECRET,
        "LOG_LEVEL": "info",
    }
    inst = Instance(env).start()
    secret_text = "the-launch-code-is-0000"
    ana = token("ana")
    try:
        await inst.wait_ready()
        async with httpx.AsyncClient(timeout=10) as http:
            r = await http.post(
                f"{inst.url}/v1/rooms/logged/messages",
                json={"text": secret_text},
                headers={"Authorization": f"Bearer {ana}", "X-Request-ID": "req-42"},
            )
            assert r.status_code == 201 and r.headers["x-request-id"] == "req-42"
            r = await http.get(
                f"{inst.url}/v1/rooms/logged/messages",
                headers={"X-Request-ID": "bad id with spaces"},
            )
            generated = r.headers["x-request-id"]
            assert generated and " " not in generated
            async with WSClient.connect(f"{inst.ws_url}?token={ana}") as ws:
                await ws.send(
                    {"type": "publish", "room": "logged", "text": secret_text, "ref": "p1"}
                )
                await ws.expect("ack")
        assert inst.stop() == 0
        lines = [orjson.loads(line) for line in inst.log().splitlines() if line.strip()]
        assert all({"ts", "level", "logger", "msg"} <= set(line) for line in lines)
        access = [line for line in lines if line["logger"] == "gateway.access"]
        assert any(line["conn"] == "req-42" and line["status"] == 201 for line in access)
        assert any(line["conn"] == generated for line in access)
        ws_lines = [line for line in lines if line["msg"].startswith("websocket")]
        assert len(ws_lines) == 2 and ws_lines[0]["conn"] == ws_lines[1]["conn"]
        raw = inst.log()
        assert secret_text not in raw
        assert ana not in raw and ana.split(".")[2] not in raw
    finally:
        inst.stop()
