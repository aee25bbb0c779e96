"""What one WebSocket, or one identity, may hold on a real gateway process:
subscriptions per socket, subscribe churn and the presence frames it would cause,
and connections per identity and per instance, refused before the upgrade."""

from __future__ import annotations

from contextlib import AsyncExitStack

import httpx
import orjson
import pytest
import websockets

from chat_gateway.config import Settings
from tests.harness import SSEClient, WSClient, embedded_env, eventually, instances
from tests.system.test_auth import SECRET, token


async def test_a_websocket_holds_at_most_max_subscriptions_and_stays_open(tmp_path):
    assert Settings().max_subscriptions_per_connection == 1000
    env = embedded_env(tmp_path, MAX_SUBSCRIPTIONS_PER_CONNECTION="3")
    async with instances(1, env) as (gw,), WSClient.connect(gw.ws_url) as ws:
        for room in ("a", "b", "c"):
            await ws.subscribe(room)
        await ws.send({"type": "subscribe", "room": "d"})
        err = await ws.expect("error")
        assert err["code"] == "too_many_subscriptions" and err["limit"] == 3, err
        # the socket stays; a held room may be subscribed again (no new place taken)
        await ws.send({"type": "ping", "ref": "still"})
        assert await ws.expect("pong") == {"type": "pong", "ref": "still"}
        assert (await ws.subscribe("b"))["room"] == "b"
        # a place freed is a place to take
        await ws.send({"type": "unsubscribe", "room": "a"})
        await ws.expect("unsubscribed")
        assert (await ws.subscribe("d"))["room"] == "d"
        await ws.send({"type": "subscribe", "room": "e"})
        assert (await ws.expect("error"))["code"] == "too_many_subscriptions"
        assert not [f for f in ws.frames if f["type"] == "subscribed" and f["room"] == "e"]


async def test_subscribe_churn_is_rate_limited_and_presence_is_debounced(gateway_env):
    env = {**gateway_env, "SUBSCRIBE_RATE_LIMIT": "100/60s", "PRESENCE_DEBOUNCE": "1"}
    room = "churn"

    async def mallory_leaves(bob: WSClient) -> list[tuple[str, str]]:
        """Until bob hears mallory leave; what he heard about her so far."""
        while True:
            frame = await bob.expect("presence", timeout=20)
            if frame["user"] == "mallory" and frame["action"] == "leave":
                return [
                    (f["action"], f["user"])
                    for f in bob.frames
                    if f["type"] == "presence" and f["user"] == "mallory"
                ]

    async with instances(1, env) as (gw,), WSClient.connect(gw.ws_url + "?user=bob") as bob:
        await bob.subscribe(room)
        # a quick reconnect is not a leave: only the final one goes out
        for _ in range(2):
            async with WSClient.connect(gw.ws_url + "?user=mallory") as again:
                await again.subscribe(room)
        assert await mallory_leaves(bob) == [("join", "mallory"), ("leave", "mallory")]

        async with WSClient.connect(gw.ws_url + "?user=mallory") as mallory:
            for _ in range(2000):
                await mallory.send({"type": "subscribe", "room": room})
                await mallory.send({"type": "unsubscribe", "room": room})
            await mallory.send({"type": "ping", "ref": "done"})
            await mallory.expect("pong", timeout=120)
            subscribed = [f for f in mallory.frames if f["type"] == "subscribed"]
            refused = [f for f in mallory.frames if f["type"] == "error"]
            assert {f["code"] for f in refused} == {"rate_limited"}
            assert len(subscribed) + len(refused) == 2000
            assert 90 <= len(subscribed) < 200, len(subscribed)
            # the other member hears one join and, once mallory stayed away, one leave
            heard = await mallory_leaves(bob)
        assert heard[2:] == [("join", "mallory"), ("leave", "mallory")], heard[:10]


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
