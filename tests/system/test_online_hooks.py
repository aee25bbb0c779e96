"""user.online / user.offline and room.occupied / room.vacated, through the outbox,
against a real webhook receiver and gateways sharing Redis and Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import pytest
import redis.asyncio as aioredis

from chat_gateway.config import ConfigError, Settings
from chat_gateway.storage.outbox import SUBJECT_WAIT
from tests.harness import REDIS_URL, Instance, WSClient, eventually
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
            # both first transitions written before A dies: one it decided and never
            # wrote would be skipped by design (the outbox moves past it)
            await eventually(lambda: events(receiver, "user", "cy"), 10)
            await eventually(lambda: events(receiver, "room", "attic"), 10)
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


async def _state(prefix: str, kind: str, name: str) -> dict[str, str]:
    """The subject's transition state in Redis (delivery/online.py)."""
    client = aioredis.from_url(REDIS_URL, decode_responses=True)
    try:
        return await client.hgetall(f"{prefix}{{{kind}:{name}}}:state")  # type: ignore[no-any-return]
    finally:
        await client.aclose()


def alternating(got: list[tuple[str, int]], kinds: tuple[str, str]) -> list[tuple[str, int]]:
    """What a subject with ``len(got)`` transitions must have been sent."""
    return [(kinds[i % 2], i + 1) for i in range(len(got))]


async def test_a_transition_written_late_holds_back_the_next_one(gateway_env):
    """eve's offline is decided (transition 2) by an instance whose outbox write
    stalls; she is back on the other instance meanwhile, whose online (transition 3)
    is written first. The receiver still gets online 1, offline 2, online 3: the
    outbox holds 3 back until 2 is there."""
    receiver = await Receiver([new_secret()]).start()
    prefix = gateway_env["KEY_PREFIX"]
    try:
        env = online_env(
            gateway_env,
            receiver,
            PRESENCE_OFFLINE_AFTER="0.3",
            FAULT_OFFLINE_WRITE_DELAY="2",
        )
        async with two(env) as (a, b):
            async with contextlib.AsyncExitStack() as on_a:
                await connect(on_a, a, "eve", "porch")
                await eventually(lambda: events(receiver, "user", "eve"), 10)
            # Offline decided (up is 0, transition 2): its write now waits 2 s.
            await eventually(lambda: _decided(prefix, "user", "eve", 2), 10)
            await eventually(lambda: _decided(prefix, "room", "porch", 2), 10)
            async with contextlib.AsyncExitStack() as on_b:
                await connect(on_b, b, "eve", "porch")
                await eventually(lambda: len(events(receiver, "user", "eve")) == 3, 15)
                await eventually(lambda: len(events(receiver, "room", "porch")) == 3, 15)
            assert events(receiver, "user", "eve") == [
                ("user.online", 1),
                ("user.offline", 2),
                ("user.online", 3),
            ]
            assert events(receiver, "room", "porch") == [
                ("room.occupied", 1),
                ("room.vacated", 2),
                ("room.occupied", 3),
            ]
            await eventually(lambda: len(events(receiver, "user", "eve")) == 4, 15)
            assert events(receiver, "user", "eve")[-1] == ("user.offline", 4)
    finally:
        await receiver.stop()


async def _decided(prefix: str, kind: str, name: str, n: int) -> bool:
    state = await _state(prefix, kind, name)
    return state.get("n") == str(n)


async def test_rapid_reconnects_across_instances_are_sent_in_transition_order(gateway_env):
    """Four users connect and disconnect at random over two instances, with no
    offline window (every last disconnect is an offline at once), one instance's
    offline writes slowed: each user's receiver sees online and offline alternate,
    numbered 1, 2, 3 ... without a gap or a repeat, ending offline."""
    receiver = await Receiver([new_secret()]).start()
    prefix = gateway_env["KEY_PREFIX"]
    users = [f"racer{i}" for i in range(4)]
    rng = random.Random(27)
    try:
        slow = online_env(
            gateway_env, receiver, PRESENCE_OFFLINE_AFTER="0", FAULT_OFFLINE_WRITE_DELAY="0.3"
        )
        fast = online_env(gateway_env, receiver, PRESENCE_OFFLINE_AFTER="0")
        a, b = Instance(slow).start(), Instance(fast).start()
        try:
            await a.wait_ready()
            await b.wait_ready()

            async def churn(user: str) -> None:
                for _ in range(12):
                    async with contextlib.AsyncExitStack() as stack:
                        for gw in rng.sample([a, b], rng.choice([1, 1, 2])):
                            await connect(stack, gw, user, f"den-{user}")
                        await asyncio.sleep(rng.uniform(0, 0.25))
                    await asyncio.sleep(rng.uniform(0, 0.25))

            await asyncio.gather(*(churn(u) for u in users))

            async def settled() -> bool:
                for user in users:
                    state = await _state(prefix, "user", user)
                    if state.get("up") != "0" or len(events(receiver, "user", user)) != int(
                        state["n"]
                    ):
                        return False
                return True

            await eventually(settled, 30)
            await asyncio.sleep(1)  # anything sent twice would have come by now
            for user in users:
                got = events(receiver, "user", user)
                assert len(got) >= 2 and len(got) % 2 == 0, (user, got)
                assert got == alternating(got, USER_EVENTS), (user, got)
                room = events(receiver, "room", f"den-{user}")
                assert room == alternating(room, ROOM_EVENTS), (user, room)
            assert receiver.unverified == []
        finally:
            a.stop()
            b.stop()
    finally:
        await receiver.stop()


async def test_a_subject_queue_hands_out_a_transition_after_its_predecessor(store):
    """On each store: transition 2 written before 1 is not handed out; once 1 is
    written, 1 goes, then 2 (chained); 3 with no 2 waits until it is SUBJECT_WAIT
    old. Pruning keeps a row until the next one is written (which waits for it)."""
    outbox = store.outbox()
    (endpoint,) = await outbox.register(["http://127.0.0.1:9/hooks"])
    now = int(time.time() * 1000)

    async def write(pos: int, ms: int = now) -> None:
        await outbox.enqueue([endpoint.id], f"evt_{pos}", "user.online", "@user/zed", pos, "{}", ms)

    await write(2)
    assert await outbox.claim([endpoint.id], 10, 30) == []
    await write(1)
    (first,) = await outbox.claim([endpoint.id], 10, 30)
    assert first.seq == 1
    second = await outbox.delivered(first, 200, lease=30, chain=True)
    assert second is not None and second.seq == 2
    assert await outbox.delivered(second, 200, lease=30, chain=True) is None
    await write(4)
    assert await outbox.claim([endpoint.id], 10, 30) == []
    # 1 and 2 are delivered and past the pruning cutoff: 2 stays, 3 waits for it.
    assert await outbox.prune(now + 1, 100) == 1
    await write(3)
    (third,) = await outbox.claim([endpoint.id], 10, 30)
    assert third.seq == 3
    assert await outbox.delivered(third, 200, lease=30, chain=False) is None
    await write(6, now - int(SUBJECT_WAIT * 1000) - 1000)  # its predecessor's writer died
    (fourth,) = await outbox.claim([endpoint.id], 10, 30)
    assert fourth.seq == 4
    fifth = await outbox.delivered(fourth, 200, lease=30, chain=True)
    assert fifth is not None and fifth.seq == 6


async def test_an_instance_kill_turns_offline_only_the_users_it_held_alone(gateway_env):
    """fay is connected on A only, gus on A and B. A is SIGKILLed: fay goes offline
    once A's membership expires; gus stays online (B still holds him) and goes
    offline once, when he leaves B. Each transition is sent once, in order."""
    receiver = await Receiver([new_secret()]).start()
    try:
        async with two(online_env(gateway_env, receiver)) as (a, b):
            async with contextlib.AsyncExitStack() as on_b:
                clients = []
                for user in ("fay", "gus"):
                    ctx = WSClient.connect(a.ws_url + f"?user={user}")
                    ws = await ctx.__aenter__()
                    await ws.subscribe("cellar")
                    clients.append(ctx)
                await connect(on_b, b, "gus", "cellar")
                await eventually(lambda: events(receiver, "user", "fay"), 10)
                await eventually(lambda: events(receiver, "user", "gus"), 10)
                a.kill()
                for ctx in clients:
                    with contextlib.suppress(Exception):
                        await ctx.__aexit__(None, None, None)
                await eventually(lambda: len(events(receiver, "user", "fay")) == 2, 20)
                await asyncio.sleep(2)  # past the offline window: gus is still on B
                assert events(receiver, "user", "gus") == [("user.online", 1)]
                assert events(receiver, "room", "cellar") == [("room.occupied", 1)]
            await eventually(lambda: len(events(receiver, "user", "gus")) == 2, 20)
            await eventually(lambda: len(events(receiver, "room", "cellar")) == 2, 20)
            await asyncio.sleep(1)  # every instance swept meanwhile: nothing more
            assert events(receiver, "user", "fay") == [("user.online", 1), ("user.offline", 2)]
            assert events(receiver, "user", "gus") == [("user.online", 1), ("user.offline", 2)]
            assert events(receiver, "room", "cellar") == [
                ("room.occupied", 1),
                ("room.vacated", 2),
            ]
    finally:
        await receiver.stop()
