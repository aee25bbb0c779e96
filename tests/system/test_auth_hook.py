"""The application's own sessions (AUTH_HOOK_URL) on a real gateway, asking a real
HTTP receiver that stands for the application's session check."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from standardwebhooks.webhooks import Webhook

from chat_gateway.access.auth import Authenticator
from chat_gateway.config import ConfigError, Settings
from tests.harness import SSEClient, WSClient, eventually, free_port, instances, log_lines
from tests.receivers import SessionReceiver, serving_sessions
from tests.system.test_auth import SECRET, bearer, token

HOOK_SECRET = "whsec_" + base64.b64encode(b"session-hook-key-0123456789abcdef").decode()


def session(sub: Any = "ana", exp: float = 600, **claims: Any) -> tuple[int, dict[str, Any]]:
    return 200, {"sub": sub, "exp": int(time.time() + exp), **claims}


def cookie(value: str) -> dict[str, str]:
    return {"Cookie": f"app_session={value}"}


def hook_env(env: dict[str, str], url: str, **extra: str) -> dict[str, str]:
    return {
        **env,
        "AUTH_HOOK_URL": url,
        "AUTH_HOOK_SECRET": HOOK_SECRET,
        "AUTH_HOOK_CACHE": "60",
        "AUTH_HOOK_TIMEOUT": "1",
        **extra,
    }


@pytest.fixture
def hook() -> Iterator[SessionReceiver]:
    with serving_sessions(SessionReceiver()) as receiver:
        yield receiver


def hook_warnings(log_path: str) -> list[dict[str, Any]]:
    return [
        line
        for line in log_lines(Path(log_path).read_text())
        if "session hook" in line.get("msg", "")
    ]


async def test_a_session_cookie_posts_and_subscribes_as_its_sub_within_its_rooms(gateway_env, hook):
    hook.answers["app_session=s1"] = session("ana", rooms=["lobby", "team:*"])
    async with instances(1, hook_env(gateway_env, hook.url)) as (gw,):
        async with httpx.AsyncClient(timeout=10) as http:
            url = f"{gw.url}/v1/rooms/lobby/messages"
            async with SSEClient.open(f"{gw.url}/v1/rooms/team:a/events", cookie("s1")) as sse:
                assert sse.status == 200
                r = await http.post(
                    url, json={"text": "hi", "author": "mallory"}, headers=cookie("s1")
                )
                assert r.status_code == 201, r.text
                assert r.json()["author"] == "ana"
                r = await http.post(
                    f"{gw.url}/v1/rooms/team:a/messages", json={"text": "t"}, headers=cookie("s1")
                )
                assert r.status_code == 201
                assert await sse.wait_for(1) == [1]
            r = await http.post(
                f"{gw.url}/v1/rooms/elsewhere/messages", json={"text": "x"}, headers=cookie("s1")
            )
            assert r.status_code == 403
            assert r.json()["error"]["code"] == "forbidden"
            r = await http.post(url, json={"text": "no cookie"})
            assert r.status_code == 401
            assert "cookie" in r.json()["error"]["message"]
        # Only the cookie, the address and the path go out, signed as webhooks are.
        headers, raw, body = hook.requests[0]
        assert set(body) == {"cookie", "address", "path"}
        assert body["cookie"] == "app_session=s1"
        assert body["address"] == "127.0.0.1"
        assert body["path"] == "/v1/rooms/team:a/events"
        Webhook(HOOK_SECRET).verify(raw, headers)
        assert hook.calls() == 1, "the answer is kept for AUTH_HOOK_CACHE seconds"


async def test_refusals_of_the_application_reach_the_client(gateway_env, hook):
    hook.answers["app_session=gone"] = (401, {})
    hook.answers["app_session=banned"] = (403, {})
    async with instances(1, hook_env(gateway_env, hook.url)) as (gw,):
        async with httpx.AsyncClient(timeout=10) as http:
            url = f"{gw.url}/v1/rooms/lobby/messages"
            r = await http.post(url, json={"text": "x"}, headers=cookie("gone"))
            assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized")
            r = await http.post(url, json={"text": "x"}, headers=cookie("banned"))
            assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")
            r = await http.get(url, headers=cookie("banned"))
            assert r.status_code == 403
            assert hook.calls("app_session=banned") == 1, "a refusal is kept too"
            hook.answers["app_session=ok"] = session()
            assert (await http.get(url, headers=cookie("ok"))).json()["messages"] == []


async def test_answers_are_kept_for_the_cache_time_then_asked_again(gateway_env, hook):
    hook.answers["app_session=s1"] = session("ana")
    env = hook_env(gateway_env, hook.url, AUTH_HOOK_CACHE="4")
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        url = f"{gw.url}/v1/rooms/lobby/messages"
        assert (await http.get(url, headers=cookie("s1"))).status_code == 200
        assert (await http.get(url, headers=cookie("s1"))).status_code == 200
        assert hook.calls() == 1

        async def asked_again() -> bool:
            assert (await http.get(url, headers=cookie("s1"))).status_code == 200
            return hook.calls() == 2

        await eventually(asked_again, timeout=30, interval=0.5)


async def test_the_cache_holds_at_most_its_size_least_recent_dropped(gateway_env, hook):
    for name in ("a", "b"):
        hook.answers[f"app_session={name}"] = session(name)
    env = hook_env(gateway_env, hook.url, AUTH_HOOK_CACHE_SIZE="1")
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        url = f"{gw.url}/v1/rooms/lobby/messages"
        for name in ("a", "a", "b", "a"):
            assert (await http.get(url, headers=cookie(name))).status_code == 200
        assert hook.calls("app_session=a") == 2
        assert hook.calls("app_session=b") == 1


def test_the_hook_needs_a_secret_to_sign_with():
    with pytest.raises(ConfigError, match="AUTH_HOOK_SECRET"):
        Settings.from_env({"AUTH_HOOK_URL": "http://app.internal/session"})
    with pytest.raises(ConfigError, match="AUTH_HOOK_URL"):
        Settings.from_env({"AUTH_HOOK_URL": "app.internal", "AUTH_HOOK_SECRET": HOOK_SECRET})
    webhook_only = Settings.from_env(
        {"AUTH_HOOK_URL": "http://app.internal/session", "WEBHOOK_SECRET": HOOK_SECRET}
    )
    assert not Authenticator.from_settings(webhook_only).open_mode


async def test_concurrent_requests_with_one_cookie_share_one_call(gateway_env, hook):
    hook.answers["app_session=s1"] = session("ana")
    hook.delay = 0.5
    async with instances(1, hook_env(gateway_env, hook.url, AUTH_HOOK_TIMEOUT="10")) as (gw,):
        async with httpx.AsyncClient(timeout=30) as http:
            url = f"{gw.url}/v1/rooms/lobby/messages"
            answers = await asyncio.gather(*(http.get(url, headers=cookie("s1")) for _ in range(8)))
            assert [r.status_code for r in answers] == [200] * 8
            assert hook.calls() == 1


async def test_a_hook_down_slow_or_failing_refuses_and_never_lets_in(gateway_env, hook):
    hook.answers["app_session=err"] = (500, {"sub": "ana", "exp": int(time.time()) + 60})
    hook.answers["app_session=huge"] = session("ana", rooms=["x" * 100] * 1000)
    down = f"http://127.0.0.1:{free_port()}/session"
    async with httpx.AsyncClient(timeout=30) as http:
        async with instances(1, hook_env(gateway_env, down)) as (gw,):
            r = await http.post(
                f"{gw.url}/v1/rooms/lobby/messages", json={"text": "x"}, headers=cookie("s1")
            )
            assert (r.status_code, r.json()["error"]["code"]) == (503, "unavailable")
        async with instances(1, hook_env(gateway_env, hook.url)) as (gw,):
            url = f"{gw.url}/v1/rooms/lobby/messages"
            r = await http.post(url, json={"text": "x"}, headers=cookie("err"))
            assert r.status_code == 503
            r = await http.post(url, json={"text": "x"}, headers=cookie("err"))
            assert r.status_code == 503
            assert hook.calls("app_session=err") == 2, "a failure is not kept"
            r = await http.post(url, json={"text": "x"}, headers=cookie("huge"))
            assert r.status_code == 503, "an answer over 64 KiB is a failed call"
            hook.delay = 3  # past AUTH_HOOK_TIMEOUT (1 s)
            hook.answers["app_session=slow"] = session("ana")
            r = await http.post(url, json={"text": "x"}, headers=cookie("slow"))
            assert r.status_code == 503
            hook.delay = 0
            hook.answers["app_session=ok"] = session("ana")
            assert (await http.get(url, headers=cookie("ok"))).json()["messages"] == []
            warned = hook_warnings(gw.log_path)
            assert [w["level"] for w in warned] == ["warning"] * len(warned)
            assert any("failed" in w["msg"] for w in warned)
            assert not any(
                line.get("level") == "error" for line in log_lines(Path(gw.log_path).read_text())
            )


async def test_bad_answers_are_refused_and_logged_once(gateway_env, hook):
    now = int(time.time())
    bad = {
        "notjson": (200, b"<html>hello</html>"),
        "list": (200, [1, 2]),
        "nosub": (200, {"exp": now + 60}),
        "numericsub": (200, {"sub": 7, "exp": now + 60}),
        "noexp": (200, {"sub": "ana"}),
        "past": (200, {"sub": "ana", "exp": now - 60}),
        "rooms": (200, {"sub": "ana", "exp": now + 60, "rooms": "lobby"}),
    }
    for name, answer in bad.items():
        hook.answers[f"app_session={name}"] = answer
    async with instances(1, hook_env(gateway_env, hook.url)) as (gw,):
        async with httpx.AsyncClient(timeout=10) as http:
            url = f"{gw.url}/v1/rooms/lobby/messages"
            for name in bad:
                for _ in range(2):
                    r = await http.post(url, json={"text": "x"}, headers=cookie(name))
                    assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized"), name
            hook.answers["app_session=ok"] = session()
            assert (await http.get(url, headers=cookie("ok"))).json()["messages"] == []
        text = Path(gw.log_path).read_text()
        assert "app_session=" not in text, "the cookie never reaches the log"
        warned = [w for w in hook_warnings(gw.log_path) if "refused" in w["msg"]]
        assert len(warned) == len(bad), warned
        assert not any(
            line.get("level") == "error" for line in log_lines(Path(gw.log_path).read_text())
        )


async def test_a_websocket_opened_with_the_cookie_closes_at_the_sessions_exp(gateway_env, hook):
    env = hook_env(gateway_env, hook.url, AUTH_LEEWAY="0")
    async with instances(1, env) as (gw,):
        hook.answers["app_session=short"] = session("dee", exp=3)
        async with WSClient.connect(gw.ws_url, additional_headers=cookie("short")) as ws:
            await ws.subscribe("lobby")
            await ws.send({"type": "publish", "room": "lobby", "text": "while valid", "ref": 1})
            ack = await ws.expect("ack")
            assert ack["message"]["author"] == "dee"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.expect("never", timeout=15)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with WSClient.connect(gw.ws_url, additional_headers=cookie("unknown")):
                pass
        assert refused.value.response.status_code == 401


async def test_a_bearer_token_still_works_beside_sessions(gateway_env, hook):
    hook.answers["app_session=s1"] = session("ana")
    env = hook_env(gateway_env, hook.url, AUTH_SECRET=SECRET)
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        url = f"{gw.url}/v1/rooms/lobby/messages"
        headers = {**bearer(token("bob")), **cookie("s1")}
        r = await http.post(url, json={"text": "x"}, headers=headers)
        assert r.status_code == 201
        assert r.json()["author"] == "bob", "the token wins over the cookie"
        r = await http.post(url, json={"text": "y"}, headers=cookie("s1"))
        assert r.json()["author"] == "ana"
        r = await http.post(url, json={"text": "z"}, headers=bearer("not.a.jwt"))
        assert r.status_code == 401
        assert hook.calls() == 1


async def test_a_stalled_session_check_holds_up_only_its_own_request(gateway_env, hook):
    """One cookie's check stalls past AUTH_HOOK_TIMEOUT: its request is refused 503
    when the timeout ends, and meanwhile other sessions post, a subscriber receives
    and the instance answers, so neither the event loop nor other rooms wait."""
    hook.answers["app_session=slow"] = session("ana")
    hook.delays["app_session=slow"] = 8
    hook.answers["app_session=ok"] = session("bo")
    env = hook_env(gateway_env, hook.url, AUTH_HOOK_TIMEOUT="4")
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=30) as http:
        async with SSEClient.open(f"{gw.url}/v1/rooms/lobby/events", cookie("ok")) as sse:
            assert sse.status == 200
            stalled = asyncio.create_task(
                http.post(
                    f"{gw.url}/v1/rooms/other/messages", json={"text": "x"}, headers=cookie("slow")
                )
            )
            await eventually(lambda: hook.calls("app_session=slow") == 1, 10)
            r = await http.post(
                f"{gw.url}/v1/rooms/lobby/messages", json={"text": "hi"}, headers=cookie("ok")
            )
            assert r.status_code == 201, r.text
            assert await sse.wait_for(1) == [1]
            assert (await http.get(f"{gw.url}/healthz")).status_code == 200
            assert not stalled.done(), "answered while the stalled check still waits"
            r = await stalled
            assert (r.status_code, r.json()["error"]["code"]) == (503, "unavailable")
