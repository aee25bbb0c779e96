"""The gateway's log: JSON lines with request and connection ids and no message
text or token; refused upgrades logged as answers, not errors; text logs that a
path cannot forge lines into."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import orjson
import pytest
import websockets

from tests.harness import (
    Instance,
    RedisServer,
    WSClient,
    embedded_env,
    eventually,
    instances,
    log_lines,
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
        # a refused upgrade is logged by its path alone: no query, so no token
        assert r"WebSocket /v1/ws\" 401" in log and r"WebSocket /v1/ws\" 422" in log
        assert "forged" not in log and "bogus" not in log
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


async def test_webhook_series_and_logs_name_a_receiver_by_id_and_host_only(tmp_path):
    from tests.system.test_webhooks import Receiver, new_secret

    receiver = await Receiver([new_secret()], answer=lambda hit: (410, {}, 0.0)).start()
    secret_path = "/services/T0001/B0002/PathSecretXyz"
    url = f"http://127.0.0.1:{receiver.port}{secret_path}?token=QuerySecretXyz"
    env = embedded_env(
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


async def test_a_websocket_is_one_line_open_one_line_closed_and_no_text_or_query(tmp_path):
    env = embedded_env(tmp_path, LOG_LEVEL="debug")
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
        env = embedded_env(tmp_path, DATABASE_URL="sqlite:///relative.db")
        gw = Instance(env, cwd=str(tmp_path)).start()
        try:
            await gw.wait_ready()
        finally:
            gw.stop()
        assert f"SQLite file {tmp_path / 'relative.db'}" in gw.log()

        with_password = pg_url.replace(
            "postgresql://postgres@", "postgresql://postgres:hunter2-pg@"
        )
        env = embedded_env(
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
