"""The gateway's log: JSON lines with request and connection ids and no message
text or token; refused upgrades logged as answers, not errors; text logs that a
path cannot forge lines into."""

from __future__ import annotations

import asyncio

import httpx
import orjson
import pytest
import websockets

from tests.harness import (
    Instance,
    WSClient,
    embedded_env,
    instances,
    no_errors,
)
from tests.system.test_auth import SECRET, token


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


async def test_refused_upgrades_are_answers_not_errors_and_tokens_stay_out_of_logs(tmp_path):
    env = embedded_env(tmp_path, AUTH_SECRET=SECRET)
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
    env = embedded_env(tmp_path, LOG_FORMAT="text")
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
