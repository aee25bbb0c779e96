"""Abuse of a connection's limits: subscriptions per WebSocket, subscribe churn and
the presence frames it would cause, and the live-figures stream."""

from __future__ import annotations

from gateway.config import Settings
from tests.harness import WSClient, instances


def embedded(tmp_path, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": f"sqlite:///{tmp_path}/abuse.db", "REDIS_URL": "memory://",
            "LOG_LEVEL": "warning", "CONNECT_RATE_LIMIT": "100000/1s", **extra}


async def test_a_websocket_holds_at_most_max_subscriptions_and_stays_open(tmp_path):
    assert Settings().max_subscriptions_per_connection == 1000
    env = embedded(tmp_path, MAX_SUBSCRIPTIONS_PER_CONNECTION="3")
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
