"""user.online / user.offline and room.occupied / room.vacated, through the outbox,
against a real webhook receiver and gateways sharing Redis and Postgres."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from chat_gateway.config import ConfigError, Settings
from tests.harness import Instance, WSClient, eventually
from tests.system.test_webhooks import Receiver, hook_env, new_secret

USER_EVENTS = ("user.online", "user.offline")
ROOM_EVENTS = ("room.occupied", "room.vacated")


def events(receiver: Receiver, key: str, name: str) -> list[tuple[str, int]]:
    """The delivered transitions of one user (key "user") or room (key "room"),
    as they first arrived: (type, transition number). An event delivered again
    (same webhook-id: its sender died before recording the success) counts once,
    as a receiver deduplicates it."""
    kinds = USER_EVENTS if key == "user" else ROOM_EVENTS
    seen: set[str] = set()
    out = []
    for h in receiver.delivered():
        if h.payload["type"] in kinds and h.payload["data"].get(key) == name:
            if h.headers["webhook-id"] not in seen:
                seen.add(h.headers["webhook-id"])
                out.append((h.payload["type"], h.payload["data"]["transition"]))
    return out


def online_env(base: dict[str, str], receiver: Receiver, **extra: str) -> dict[str, str]:
    return hook_env(base, receiver, **{"PRESENCE_OFFLINE_AFTER": "1", "PRESENCE_TTL": "3", **extra})


@contextlib.asynccontextmanager
async def two(env: dict[str, str]) -> Any:
    a, b = Instance(env).start(), Instance(env).start()
    try:
        await a.wait_ready()
        await b.wait_ready()
        yield a, b
    finally:
        a.stop()
        b.stop()


async def connect(stack: contextlib.AsyncExitStack, gw: Instance, user: str, room: str) -> Any:
    ws = await stack.enter_async_context(WSClient.connect(gw.ws_url + f"?user={user}"))
    await ws.subscribe(room)
    return ws


async def test_online_once_across_instances_and_offline_once_after_the_window(gateway_env):
    """ana connects on A, then on B, then closes A: online once, not offline. Closing
    B too: offline once, after PRESENCE_OFFLINE_AFTER. The room likewise."""
    receiver = await Receiver([new_secret()]).start()
    try:
        async with two(online_env(gateway_env, receiver)) as (a, b):
            async with contextlib.AsyncExitStack() as on_b:
                async with contextlib.AsyncExitStack() as on_a:
                    await connect(on_a, a, "ana", "lobby")
                    await eventually(lambda: events(receiver, "user", "ana"), 10)
                    await connect(on_b, b, "ana", "lobby")
                # A closed, B still holds ana: past the window, still online
                await asyncio.sleep(2.5)
                assert events(receiver, "user", "ana") == [("user.online", 1)]
                assert events(receiver, "room", "lobby") == [("room.occupied", 1)]
            await eventually(lambda: len(events(receiver, "user", "ana")) == 2, 15)
            await eventually(lambda: len(events(receiver, "room", "lobby")) == 2, 15)
            await asyncio.sleep(2)  # every instance swept meanwhile: nothing more
            assert events(receiver, "user", "ana") == [("user.online", 1), ("user.offline", 2)]
            assert events(receiver, "room", "lobby") == [
                ("room.occupied", 1),
                ("room.vacated", 2),
            ]
        assert receiver.unverified == []
    finally:
        await receiver.stop()


async def test_a_reconnect_within_the_window_is_not_offline(gateway_env):
    """bo leaves A and is back on B before PRESENCE_OFFLINE_AFTER: no offline, no
    second online; when he leaves for good, offline, then online again on return,
    each numbered in order."""
    receiver = await Receiver([new_secret()]).start()
    try:
        env = online_env(gateway_env, receiver, PRESENCE_OFFLINE_AFTER="2")
        async with two(env) as (a, b):
            async with contextlib.AsyncExitStack() as on_a:
                await connect(on_a, a, "bo", "den")
                await eventually(lambda: events(receiver, "user", "bo"), 10)
            async with contextlib.AsyncExitStack() as on_b:
                await connect(on_b, b, "bo", "den")
                await asyncio.sleep(3)
                assert events(receiver, "user", "bo") == [("user.online", 1)]
            await eventually(lambda: len(events(receiver, "user", "bo")) == 2, 15)
            async with contextlib.AsyncExitStack() as again:
                await connect(again, a, "bo", "den")
                await eventually(lambda: len(events(receiver, "user", "bo")) == 3, 15)
            await eventually(lambda: len(events(receiver, "user", "bo")) == 4, 15)
            assert events(receiver, "user", "bo") == [
                ("user.online", 1),
                ("user.offline", 2),
                ("user.online", 3),
                ("user.offline", 4),
            ]
    finally:
        await receiver.stop()


async def test_a_killed_instance_turns_its_users_offline_within_the_ttl(gateway_env):
    """cy's only connection is on A, which is SIGKILLed: B sends her offline (and
    the room vacated) once A's membership has expired, PRESENCE_TTL later."""
    receiver = await Receiver([new_secret()]).start()
    try:
        async with two(online_env(gateway_env, receiver)) as (a, _b):
            ws = WSClient.connect(a.ws_url + "?user=cy")
            client = await ws.__aenter__()
            await client.subscribe("attic")
            await eventually(lambda: events(receiver, "user", "cy"), 10)
            a.kill()
            with contextlib.suppress(Exception):
                await ws.__aexit__(None, None, None)
            await eventually(lambda: len(events(receiver, "user", "cy")) == 2, 20)
            await eventually(lambda: len(events(receiver, "room", "attic")) == 2, 20)
            await asyncio.sleep(1)
            assert events(receiver, "user", "cy") == [("user.online", 1), ("user.offline", 2)]
            assert events(receiver, "room", "attic") == [
                ("room.occupied", 1),
                ("room.vacated", 2),
            ]
    finally:
        await receiver.stop()


async def test_one_instance_without_redis_counts_locally(tmp_path):
    """memory:// and SQLite: the instance's own counts decide, with the same window."""
    receiver = await Receiver([new_secret()]).start()
    env = online_env(
        {
            "DATABASE_URL": f"sqlite:///{tmp_path}/hooks.db",
            "REDIS_URL": "memory://",
            "RATE_LIMIT": "100000/1s",
            "LOG_LEVEL": "warning",
        },
        receiver,
    )
    gw = Instance(env).start()
    try:
        await gw.wait_ready()
        async with contextlib.AsyncExitStack() as first:
            await connect(first, gw, "di", "hall")
            await eventually(lambda: events(receiver, "user", "di"), 10)
        async with contextlib.AsyncExitStack() as back:  # within the window
            await connect(back, gw, "di", "hall")
            await asyncio.sleep(1.5)
        await eventually(lambda: len(events(receiver, "user", "di")) == 2, 15)
        await eventually(lambda: len(events(receiver, "room", "hall")) == 2, 15)
        assert events(receiver, "user", "di") == [("user.online", 1), ("user.offline", 2)]
        assert events(receiver, "room", "hall") == [("room.occupied", 1), ("room.vacated", 2)]
    finally:
        gw.stop()
        await receiver.stop()


def test_a_negative_offline_window_is_refused():
    with pytest.raises(ConfigError, match="PRESENCE_OFFLINE_AFTER"):
        Settings(presence_offline_after=-1.0).validated()
    assert Settings(presence_offline_after=0.0).validated().presence_offline_after == 0.0
