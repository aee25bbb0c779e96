"""Auth on a real gateway: HS256 user tokens signed here, the rooms claim, API keys."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import httpx
import jwt
import orjson
import pytest
import websockets

from tests.harness import SSEClient, WSClient, instances

SECRET = "test-secret-" + "0123456789abcdef" * 4


def token(
    sub: Any = "ana",
    *,
    exp: float | None = 60,
    secret: str = SECRET,
    algorithm: str = "HS256",
    **claims: Any,
) -> str:
    payload: dict[str, Any] = dict(claims)
    if sub is not None:
        payload["sub"] = sub
    if exp is not None:
        payload["exp"] = int(time.time() + exp)
    return jwt.encode(payload, secret, algorithm=algorithm)


def unsigned(payload: dict[str, Any]) -> str:
    def b64(obj: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(orjson.dumps(obj)).rstrip(b"=").decode()

    return f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64(payload)}."


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


@pytest.fixture
def auth_env(gateway_env: dict[str, str]) -> dict[str, str]:
    return {**gateway_env, "AUTH_SECRET": SECRET, "AUTH_LEEWAY": "5", "API_KEYS": "key-one,key-two"}


async def test_bad_tokens_are_refused_and_store_nothing(auth_env):
    async with instances(1, auth_env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        url = f"{gw.url}/v1/rooms/lobby/messages"
        body = {"text": "hi"}
        refused = {
            "no header": {},
            "not bearer": {"Authorization": f"Basic {token()}"},
            "garbage": bearer("not.a.jwt"),
            "wrong secret": bearer(token(secret="another-" + "0123456789abcdef" * 4)),
            "expired past leeway": bearer(token(exp=-30)),
            "alg none": bearer(unsigned({"sub": "ana", "exp": int(time.time()) + 60})),
            "alg HS512": bearer(token(algorithm="HS512")),
            "no sub": bearer(token(sub=None)),
            "no exp": bearer(token(exp=None)),
            "empty sub": bearer(token(sub="")),
            "numeric sub": bearer(jwt.encode({"sub": 7, "exp": int(time.time()) + 60}, SECRET)),
            "rooms not a list": bearer(token(rooms="lobby")),
            "not yet valid": bearer(token(nbf=int(time.time()) + 120)),
        }
        for case, headers in refused.items():
            r = await http.post(url, json=body, headers=headers)
            assert r.status_code == 401, case
            assert r.json()["error"]["code"] == "unauthorized", case
            assert r.json()["error"]["message"], case
            r = await http.get(url, headers=headers)
            assert r.status_code == 401, case
        page = (await http.get(url, headers=bearer(token()))).json()
        assert page["messages"] == [], "a refused post must store nothing"

        # within the clock leeway an expired token still counts; author is always sub
        r = await http.post(
            url, json={"text": "hi", "author": "mallory"}, headers=bearer(token("ana", exp=-2))
        )
        assert r.status_code == 201, r.text
        assert r.json()["author"] == "ana"


async def test_rooms_claim_governs_read_and_post_on_every_transport(auth_env):
    tok = token("bob", rooms=["lobby", "team:*"])
    async with instances(1, auth_env) as (gw,), httpx.AsyncClient(timeout=10) as http:

        def url(room: str) -> str:
            return f"{gw.url}/v1/rooms/{room}/messages"

        for room in ("lobby", "team:red", "team:blue.x"):
            r = await http.post(url(room), json={"text": "in"}, headers=bearer(tok))
            assert r.status_code == 201, (room, r.text)
        for room in ("lobbyx", "team", "teamred", "other"):
            r = await http.post(url(room), json={"text": "out"}, headers=bearer(tok))
            assert r.status_code == 403, room
            assert r.json()["error"]["code"] == "forbidden"
            r = await http.get(url(room), headers=bearer(tok))
            assert r.status_code == 403, room
        # without a rooms claim, every room
        r = await http.post(url("other"), json={"text": "free"}, headers=bearer(token("cy")))
        assert r.status_code == 201

        # SSE: ?token=, refused outside the claim
        r = await http.get(f"{gw.url}/v1/rooms/other/events", params={"token": tok})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = await http.get(f"{gw.url}/v1/rooms/lobby/events")
        assert r.status_code == 401
        async with SSEClient.open(f"{gw.url}/v1/rooms/lobby/events?token={tok}&since=0") as sse:
            assert sse.status == 200
            assert await sse.wait_for(1) == [1]

        # WebSocket: no token or an expired one is refused at the upgrade
        for bad in ("", f"?token={token(exp=-60)}", f"?token={unsigned({'sub': 'x'})}"):
            with pytest.raises(websockets.InvalidStatus) as exc:
                async with WSClient.connect(gw.ws_url + bad):
                    pass
            assert exc.value.response.status_code == 401
            assert orjson.loads(exc.value.response.body)["error"]["code"] == "unauthorized"

        async with WSClient.connect(f"{gw.ws_url}?token={tok}") as ws:
            await ws.send({"type": "subscribe", "room": "other"})
            err = await ws.expect("error")
            assert err["code"] == "forbidden"
            await ws.send({"type": "publish", "room": "other", "text": "x", "ref": 9})
            err = await ws.expect("error")
            assert err["code"] == "forbidden" and err["ref"] == 9
            # the socket stays, and inside the claim everything works; author is sub
            assert (await ws.subscribe("team:red"))["seq"] == 1
            await ws.send(
                {
                    "type": "publish",
                    "room": "team:red",
                    "text": "y",
                    "ref": "r",
                    "author": "mallory",
                }
            )
            ack = await ws.expect("ack")
            assert ack["message"]["author"] == "bob" and ack["message"]["seq"] == 2
        page = (await http.get(url("other"), headers=bearer(token("cy")))).json()
        assert [m["text"] for m in page["messages"]] == ["free"]


async def test_api_keys_guard_publish(auth_env):
    async with instances(1, auth_env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        url = f"{gw.url}/v1/publish"
        event = {"room": "lobby", "event": "tick", "data": {"n": 1}}
        for headers in (
            {},
            bearer("key-three"),
            bearer("key-onex"),
            bearer("key-on"),
            bearer(token()),
            {"Authorization": "key-one"},
        ):
            r = await http.post(url, json=event, headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["code"] == "unauthorized"
        async with WSClient.connect(f"{gw.ws_url}?token={token()}") as ws:
            await ws.subscribe("lobby")
            for key in ("key-one", "key-two"):
                r = await http.post(url, json=event, headers=bearer(key))
                assert r.status_code == 202, r.text
                assert r.headers["RateLimit-Limit"]
            frames = [await ws.expect("event"), await ws.expect("event")]
            assert frames[0] == {
                "type": "event",
                "room": "lobby",
                "event": "tick",
                "data": {"n": 1},
            }
            await ws.send({"type": "ping"})
            assert (await ws.expect("pong"))["type"] == "pong", "no refused event leaked"
            assert [f for f in ws.frames if f["type"] == "event"] == frames


async def test_a_websocket_is_closed_1008_when_its_token_expires(auth_env):
    env = {**auth_env, "AUTH_LEEWAY": "0"}
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        short = token("dee", exp=2)
        async with WSClient.connect(f"{gw.ws_url}?token={short}") as ws:
            await ws.subscribe("lobby")
            await ws.send({"type": "publish", "room": "lobby", "text": "while valid", "ref": 1})
            assert (await ws.expect("ack"))["message"]["seq"] == 1
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.expect("never", timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            assert "expired" in closed.value.rcvd.reason
        page = (await http.get(f"{gw.url}/v1/rooms/lobby/messages", headers=bearer(token()))).json()
        assert [m["text"] for m in page["messages"]] == ["while valid"]


async def test_an_sse_stream_ends_when_its_token_expires(auth_env):
    env = {**auth_env, "AUTH_LEEWAY": "0"}
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        short = token("eve", exp=2)
        async with SSEClient.open(f"{gw.url}/v1/rooms/lobby/events?token={short}") as sse:
            assert sse.status == 200
            r = await http.post(
                f"{gw.url}/v1/rooms/lobby/messages", json={"text": "hi"}, headers=bearer(token())
            )
            assert r.status_code == 201
            assert await sse.wait_for(1) == [1]
            await asyncio.wait_for(sse.ended.wait(), 10)
            assert sse.seqs() == [1]
