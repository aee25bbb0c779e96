"""Moderation on real gateway processes: two instances over one Postgres and one
Redis (bans end subscriptions everywhere, lifts take effect everywhere, slow mode
is shared), a ban during a Redis restart, webhooks, and the embedded SQLite store."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import httpx
import jwt
import pytest

from tests.harness import (
    RedisServer,
    SSEClient,
    WSClient,
    eventually,
    instances,
    t,
)
from tests.system.test_webhooks import Receiver, hook_env, new_secret

SECRET = "moderation-test-secret-0123456789abcdef"
KEY = "moderation-key-1"
API = {"Authorization": f"Bearer {KEY}"}


def token(sub: str, **claims: Any) -> str:
    return jwt.encode(
        {"sub": sub, "exp": int(time.time()) + 600, **claims}, SECRET, algorithm="HS256"
    )


def as_user(sub: str, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub, **claims)}"}


@pytest.fixture
def env(gateway_env: dict[str, str]) -> dict[str, str]:
    return {**gateway_env, "AUTH_SECRET": SECRET, "API_KEYS": KEY}


def code(r: httpx.Response) -> str:
    return str(r.json()["error"]["code"])


async def post(http: httpx.AsyncClient, base: str, room: str, sub: str, text: str = "hi") -> Any:
    return await http.post(
        f"{base}/v1/rooms/{room}/messages", json={"text": text}, headers=as_user(sub)
    )


async def test_a_ban_ends_subscriptions_on_every_instance_and_refuses_every_path(env):
    room = "lobby"
    async with instances(2, env) as (a, b), httpx.AsyncClient(timeout=t(10)) as http:
        first = await post(http, a.url, room, "ana", "before the ban")
        assert first.status_code == 201
        async with (
            WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ana_ws,
            SSEClient.open(
                f"{b.url}/v1/rooms/{room}/events?since=0&token={token('ana')}"
            ) as ana_sse,
            WSClient.connect(f"{b.ws_url}?token={token('bo')}") as bo_ws,
        ):
            await ana_ws.subscribe(room)
            await bo_ws.subscribe(room)
            await eventually(lambda: ana_sse.seqs() == [1])
            r = await http.post(
                f"{b.url}/v1/rooms/{room}/bans",
                json={"user": "ana", "reason": "spam"},
                headers=API,
            )
            assert r.status_code == 201, r.text
            ban = r.json()
            assert ban["user"] == "ana" and ban["by"] == "api_key" and ban["expires_at"] is None
            gone = await ana_ws.expect("unsubscribed")
            assert gone == {"type": "unsubscribed", "room": room, "reason": "banned"}
            await asyncio.wait_for(ana_sse.ended.wait(), t(10))
            assert [e["json"] for e in ana_sse.events if e.get("event") == "unsubscribed"] == [
                {"room": room, "reason": "banned"}
            ]
            # Every path, on both instances.
            for base in (a.url, b.url):
                r = await post(http, base, room, "ana", "after the ban")
                assert r.status_code == 403 and code(r) == "banned", r.text
                r = await http.get(f"{base}/v1/rooms/{room}/messages", headers=as_user("ana"))
                assert r.status_code == 403 and code(r) == "banned"
                r = await http.get(f"{base}/v1/rooms/{room}/read", headers=as_user("ana"))
                assert code(r) == "banned"
                r = await http.patch(
                    f"{base}/v1/rooms/{room}/messages/1",
                    json={"text": "edited"},
                    headers=as_user("ana"),
                )
                assert code(r) == "banned"
                r = await http.get(
                    f"{base}/v1/rooms/{room}/events?token={token('ana')}", timeout=t(5)
                )
                assert r.status_code == 403 and code(r) == "banned"
                r = await http.get(f"{base}/v1/search?q=before", headers=as_user("ana"))
                assert r.status_code == 200 and r.json()["results"] == []
                r = await http.get(f"{base}/v1/search?q=before", headers=as_user("bo"))
                assert len(r.json()["results"]) == 1, "others still find it"
            await ana_ws.send({"type": "subscribe", "room": room})
            refused = await ana_ws.expect("error")
            assert refused["code"] == "banned" and refused["room"] == room
            await ana_ws.send({"type": "publish", "room": room, "text": "x", "ref": 2})
            refused = await ana_ws.expect("error")
            assert refused["code"] == "banned" and refused["ref"] == 2
            await ana_ws.send({"type": "publish", "room": "elsewhere", "text": "x", "ref": 3})
            assert (await ana_ws.expect("ack"))["ref"] == 3, "a ban is per room"
            listed = await http.get(f"{a.url}/v1/rooms/{room}/bans", headers=API)
            assert [x["user"] for x in listed.json()["bans"]] == ["ana"]
            # Lifted on one instance: at once on the other.
            r = await http.delete(f"{a.url}/v1/rooms/{room}/bans/ana", headers=API)
            assert r.status_code == 200 and r.json()["action"] == "unbanned"
            r = await http.delete(f"{a.url}/v1/rooms/{room}/bans/ana", headers=API)
            assert r.status_code == 404
            r = await post(http, b.url, room, "ana", "back")
            assert r.status_code == 201, r.text
            assert await bo_ws.messages(room, 1) == [2], "nothing of ana's refused posts"
            log = await http.get(f"{b.url}/v1/rooms/{room}/moderation", headers=API)
            assert [x["action"] for x in log.json()["actions"]] == ["unbanned", "banned"]


async def test_only_an_api_key_or_a_moderator_of_the_room_moderates(env):
    async with instances(1, env) as (a,), httpx.AsyncClient(timeout=t(10)) as http:
        url = f"{a.url}/v1/rooms/team:1/mutes"
        r = await http.post(url, json={"user": "ana"}, headers=as_user("bo"))
        assert r.status_code == 403 and code(r) == "forbidden"
        r = await http.post(url, json={"user": "ana"}, headers=as_user("bo", moderate=["team:2"]))
        assert r.status_code == 403
        r = await http.get(f"{a.url}/v1/rooms/team:1/moderation", headers=as_user("bo"))
        assert r.status_code == 403
        mod = as_user("bo", moderate=["team:*"])
        for bad in (
            {},
            {"user": ""},
            {"user": "ana", "duration": 0},
            {"user": "ana", "duration": True},
            {"user": "ana", "reason": 5},
            {"user": "ana", "extra": 1},
        ):
            r = await http.post(url, json=bad, headers=mod)
            assert r.status_code == 422 and code(r) == "invalid_request", (bad, r.text)
        r = await http.put(f"{a.url}/v1/rooms/team:1/settings", json={"slow_mode": -1}, headers=mod)
        assert r.status_code == 422
        r = await http.get(f"{a.url}/v1/rooms/team:1/moderation", headers=API)
        assert r.json()["actions"] == [], "a refused request changes nothing"
        r = await http.post(url, json={"user": "ana", "duration": 60}, headers=mod)
        assert r.status_code == 201 and r.json()["by"] == "bo"
        assert r.json()["expires_at"] is not None


async def test_a_mute_lets_read_but_not_post_edit_or_type_and_a_lift_works_at_once(env):
    room = "lobby"
    async with instances(2, env) as (a, b), httpx.AsyncClient(timeout=t(10)) as http:
        assert (await post(http, a.url, room, "ana", "mine")).status_code == 201
        # Both instances hold the room's restrictions in their caches now.
        assert (await post(http, b.url, room, "ana", "mine too")).status_code == 201
        r = await http.post(
            f"{a.url}/v1/rooms/{room}/mutes",
            json={"user": "ana", "duration": 3600},
            headers=as_user("mo", moderate=[room]),
        )
        assert r.status_code == 201
        async with WSClient.connect(f"{b.ws_url}?token={token('ana')}") as ana:
            await ana.subscribe(room)
            r = await post(http, b.url, room, "ana", "muted?")
            assert r.status_code == 403 and code(r) == "muted"
            assert r.json()["error"]["expires_in"] > 3000
            r = await http.get(f"{b.url}/v1/rooms/{room}/messages", headers=as_user("ana"))
            assert r.status_code == 200, "a muted user reads"
            r = await http.patch(
                f"{b.url}/v1/rooms/{room}/messages/1", json={"text": "x"}, headers=as_user("ana")
            )
            assert code(r) == "muted"
            await ana.send({"type": "typing", "room": room})
            assert (await ana.expect("error"))["code"] == "muted"
            await ana.send({"type": "edit", "room": room, "seq": 1, "text": "x", "ref": 8})
            assert (await ana.expect("error"))["code"] == "muted"
            r = await http.delete(f"{a.url}/v1/rooms/{room}/mutes/ana", headers=API)
            assert r.status_code == 200
            r = await post(http, b.url, room, "ana", "free again")
            assert r.status_code == 201, "lifted on A, at once on B"
            await ana.send({"type": "publish", "room": room, "text": "ws", "ref": 9})
            assert (await ana.expect("ack"))["ref"] == 9


async def test_slow_mode_is_shared_by_instances_and_spares_moderators(env):
    room = "slow"
    async with instances(2, env) as (a, b), httpx.AsyncClient(timeout=t(10)) as http:
        r = await http.put(
            f"{a.url}/v1/rooms/{room}/settings", json={"slow_mode": 600}, headers=API
        )
        assert r.status_code == 200 and r.json() == {"room": room, "slow_mode": 600}
        r = await http.get(f"{b.url}/v1/rooms/{room}/settings", headers=as_user("ana"))
        assert r.json()["slow_mode"] == 600
        assert (await post(http, a.url, room, "ana")).status_code == 201
        r = await post(http, b.url, room, "ana")
        assert r.status_code == 429 and code(r) == "slow_mode", r.text
        assert 0 < r.json()["error"]["retry_after"] <= 600
        assert int(r.headers["retry-after"]) >= 1
        async with WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ana:
            await ana.send({"type": "publish", "room": room, "text": "again", "ref": 1})
            refused = await ana.expect("error")
            assert refused["code"] == "slow_mode" and refused["retry_after"] > 0
        assert (await post(http, b.url, room, "bo")).status_code == 201, "per user"
        mod = as_user("mo", moderate=[room])
        for _ in range(3):
            r = await http.post(
                f"{a.url}/v1/rooms/{room}/messages", json={"text": "m"}, headers=mod
            )
            assert r.status_code == 201, "a moderator is not slowed"
        r = await http.put(f"{b.url}/v1/rooms/{room}/settings", json={"slow_mode": 0}, headers=API)
        assert (await post(http, a.url, room, "ana")).status_code == 201, "off on every instance"


async def test_two_instances_posting_store_nothing_after_the_bans_answer(env, pg_url):
    room = "race"
    async with instances(2, env) as (a, b), httpx.AsyncClient(timeout=t(10)) as http:
        stop = asyncio.Event()

        async def poster(base: str) -> None:
            async with WSClient.connect(
                f"{base.replace('http', 'ws')}/v1/ws?token={token('ana')}"
            ) as ws:
                ref = 0
                while not stop.is_set():
                    ref += 1
                    await ws.send({"type": "publish", "room": room, "text": "w", "ref": ref})
                    if ref % 20 == 0:
                        await post(http, base, room, "ana", "h")

        tasks = [asyncio.create_task(poster(base)) for base in (a.url, b.url, a.url, b.url)]
        db = await asyncpg.connect(pg_url)
        try:
            count = "SELECT count(*) FROM messages WHERE room = $1 AND author = 'ana'"
            await eventually(lambda: db.fetchval(count, room))
            r = await http.post(f"{a.url}/v1/rooms/{room}/bans", json={"user": "ana"}, headers=API)
            assert r.status_code == 201
            at_answer = await db.fetchval(count, room)
            await asyncio.sleep(0.5)  # the posters keep trying on both instances
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            assert await db.fetchval(count, room) == at_answer
        finally:
            stop.set()
            await db.close()


async def test_a_ban_during_a_redis_restart_is_enforced_from_the_store(env):
    redis = RedisServer()
    redis.start()
    try:
        cut = {**env, "REDIS_URL": redis.url}
        async with instances(2, cut) as (a, b), httpx.AsyncClient(timeout=t(10)) as http:
            assert (await post(http, b.url, "r", "ana")).status_code == 201  # cached: allowed
            redis.stop()
            r = await http.post(f"{a.url}/v1/rooms/r/bans", json={"user": "ana"}, headers=API)
            assert r.status_code in (201, 503), r.text  # stored either way
            r = await post(http, b.url, "r", "ana")
            assert r.status_code == 403 and code(r) == "banned", r.text
            redis.start()
            r = await post(http, b.url, "r", "ana")
            assert code(r) == "banned"
    finally:
        redis.stop()


async def test_moderation_actions_go_out_as_webhooks(env):
    receiver = await Receiver([new_secret()]).start()
    try:
        hooked = {**hook_env(env, receiver), "API_KEYS": KEY}
        async with instances(1, hooked) as (a,), httpx.AsyncClient(timeout=t(10)) as http:
            base = f"{a.url}/v1/rooms/r"
            await http.post(f"{base}/bans", json={"user": "ana", "duration": 60}, headers=API)
            await http.delete(f"{base}/bans/ana", headers=API)
            await http.post(f"{base}/mutes", json={"user": "bo"}, headers=API)
            await http.delete(f"{base}/mutes/bo", headers=API)
            await http.put(f"{a.url}/v1/rooms/r/settings", json={"slow_mode": 5}, headers=API)
            types = await eventually(
                lambda: (
                    len(receiver.delivered()) >= 5
                    and [h.payload["type"] for h in receiver.delivered()]
                )
            )
            assert types == [
                "moderation.banned",
                "moderation.unbanned",
                "moderation.muted",
                "moderation.unmuted",
                "moderation.slow_mode",
            ]
            first = receiver.delivered()[0].payload["data"]
            assert first["room"] == "r" and first["user"] == "ana" and first["expires_at"]
            assert not receiver.unverified
    finally:
        await receiver.stop()


async def test_embedded_store_bans_and_survives_a_restart(tmp_path):
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/chat.db",
        "REDIS_URL": "memory://",
        "AUTH_SECRET": SECRET,
        "API_KEYS": KEY,
        "LOG_LEVEL": "warning",
    }
    async with instances(1, env) as (a,), httpx.AsyncClient(timeout=t(10)) as http:
        r = await http.post(f"{a.url}/v1/rooms/r/bans", json={"user": "ana"}, headers=API)
        assert r.status_code == 201
        await http.put(f"{a.url}/v1/rooms/r/settings", json={"slow_mode": 600}, headers=API)
    async with instances(1, env) as (a,), httpx.AsyncClient(timeout=t(10)) as http:
        r = await post(http, a.url, "r", "ana")
        assert r.status_code == 403 and code(r) == "banned"
        assert (await post(http, a.url, "r", "bo")).status_code == 201
        r = await post(http, a.url, "r", "bo")
        assert r.status_code == 429 and code(r) == "slow_mode", "per instance without Redis"
        log = await http.get(f"{a.url}/v1/rooms/r/moderation?limit=1", headers=API)
        body = log.json()
        assert [x["action"] for x in body["actions"]] == ["slow_mode"]
        older = await http.get(
            f"{a.url}/v1/rooms/r/moderation?cursor={body['next_cursor']}", headers=API
        )
        assert [x["action"] for x in older.json()["actions"]] == ["banned"]
