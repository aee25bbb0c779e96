"""The server API on three real gateway processes (one Postgres, one Redis), and in
memory:// mode: every instance acts on its own connections."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import jwt
import pytest
import redis.asyncio as aioredis
import websockets

from chat_gateway.redisio.context import RedisContext
from chat_gateway.storage import Page, RedisHistoryCache
from chat_gateway.storage.postgres import PostgresStore
from tests.harness import (
    REDIS_URL,
    RedisClusterServers,
    RedisServer,
    SSEClient,
    WSClient,
    eventually,
    instances,
    t,
)

SECRET = "server-api-test-secret-0123456789abcdef"
KEY = "backend-key-1"
API = {"Authorization": f"Bearer {KEY}"}


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")


def user(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub)}"}


@pytest.fixture
def env(gateway_env: dict[str, str]) -> dict[str, str]:
    return {**gateway_env, "AUTH_SECRET": SECRET, "API_KEYS": f"other-key,{KEY}"}


async def closed_with(ws: WSClient, timeout: float = 10) -> Any:
    """The close frame the server sent (messages before it are kept in ``frames``)."""
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await ws.recv(timeout)
    assert closed.value.rcvd is not None, "the socket closed without a close frame"
    return closed.value.rcvd


async def ended(sse: SSEClient, timeout: float = 10) -> None:
    await asyncio.wait_for(sse.ended.wait(), t(timeout))


def named(sse: SSEClient, event: str) -> list[dict[str, Any]]:
    return [e["json"] for e in sse.events if e.get("event") == event]


async def post(
    http: httpx.AsyncClient, base: str, room: str, text: str, sub: str = "poster"
) -> dict[str, Any]:
    r = await http.post(f"{base}/v1/rooms/{room}/messages", json={"text": text}, headers=user(sub))
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_disconnect_closes_every_connection_of_the_user_on_every_instance(env):
    room = "lobby"
    async with instances(3, env) as (a, b, c), httpx.AsyncClient(timeout=t(10)) as http:
        async with (
            WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ana_a,
            WSClient.connect(f"{b.ws_url}?token={token('ana')}") as ana_b,
            WSClient.connect(f"{c.ws_url}?token={token('ana')}") as ana_idle,
            SSEClient.open(f"{c.url}/v1/rooms/{room}/events?token={token('ana')}") as ana_sse,
            WSClient.connect(f"{a.ws_url}?token={token('bob')}") as bob,
            SSEClient.open(f"{b.url}/v1/rooms/{room}/events?token={token('bob')}") as bob_sse,
        ):
            for ws in (ana_a, ana_b, bob):
                await ws.subscribe(room)
            assert ana_sse.status == 200 and bob_sse.status == 200
            await post(http, a.url, room, "before")
            await bob.messages(room, 1)
            await bob_sse.wait_for(1)

            r = await http.post(
                f"{b.url}/v1/server/disconnect",
                headers=API,
                json={"user": "ana", "reason": "banned for spam"},
            )
            assert r.status_code == 202, r.text
            # every WS of ana, subscribed or not, on every instance: 4001 with the reason
            for ws in (ana_a, ana_b, ana_idle):
                close = await closed_with(ws)
                assert (close.code, close.reason) == (4001, "banned for spam")
            # her SSE stream ends, told why
            await ended(ana_sse)
            assert named(ana_sse, "disconnected") == [{"reason": "banned for spam"}]

            # bob is left alone, on both transports
            await post(http, c.url, room, "after")
            assert await bob.messages(room, 2) == [1, 2]
            assert await bob_sse.wait_for(2) == [1, 2]
            assert not bob_sse.ended.is_set()

            # the user may reconnect (the backend did not revoke the token)
            async with WSClient.connect(f"{a.ws_url}?token={token('ana')}") as again:
                assert (await again.subscribe(room, since=0))["seq"] == 2
                assert await again.messages(room, 2) == [1, 2]
            # a user with no connection anywhere: accepted, nothing happens
            r = await http.post(
                f"{a.url}/v1/server/disconnect", headers=API, json={"user": "nobody"}
            )
            assert r.status_code == 202


async def test_unsubscribe_ends_the_users_subscriptions_to_one_room(env):
    async with instances(3, env) as (a, b, c), httpx.AsyncClient(timeout=t(10)) as http:
        async with (
            WSClient.connect(f"{a.ws_url}?token={token('bob')}") as bob_a,
            WSClient.connect(f"{b.ws_url}?token={token('bob')}") as bob_b,
            SSEClient.open(f"{c.url}/v1/rooms/r1/events?token={token('bob')}") as bob_r1,
            SSEClient.open(f"{c.url}/v1/rooms/r2/events?token={token('bob')}") as bob_r2,
            WSClient.connect(f"{b.ws_url}?token={token('cy')}") as cy,
        ):
            for ws in (bob_a, bob_b, cy):
                await ws.subscribe("r1")
                await ws.subscribe("r2")

            r = await http.post(
                f"{c.url}/v1/server/unsubscribe",
                headers=API,
                json={"user": "bob", "room": "r1", "reason": "muted"},
            )
            assert r.status_code == 202, r.text
            for ws in (bob_a, bob_b):
                frame = await ws.expect("unsubscribed")
                assert frame == {"type": "unsubscribed", "room": "r1", "reason": "muted"}
            await ended(bob_r1)
            assert named(bob_r1, "unsubscribed") == [{"room": "r1", "reason": "muted"}]

            await post(http, a.url, "r1", "one")
            await post(http, a.url, "r2", "two")
            # bob's sockets stay open and keep r2; only cy still gets r1
            for ws in (bob_a, bob_b):
                assert await ws.messages("r2", 1) == [1]
                assert ws.seqs("r1") == []
            assert await cy.messages("r1", 1) == [1]
            assert await cy.messages("r2", 1) == [1]
            assert await bob_r2.wait_for(1) == [1] and not bob_r2.ended.is_set()
            # ping through the socket: nothing for r1 was queued before the pong
            await bob_a.send({"type": "ping"})
            await bob_a.expect("pong")
            assert bob_a.seqs("r1") == []
            # bob may subscribe again (no ban without a revoked token)
            await bob_a.subscribe("r1", since=0)
            assert await bob_a.messages("r1", 1) == [1]


async def info(http: httpx.AsyncClient, base: str, room: str) -> dict[str, Any]:
    r = await http.get(f"{base}/v1/server/rooms/{room}", headers=API)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


async def all_rooms(http: httpx.AsyncClient, base: str, limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor is not None:
            params["cursor"] = cursor
        r = await http.get(f"{base}/v1/server/rooms", headers=API, params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        assert len(body["rooms"]) <= limit
        out.extend(body["rooms"])
        cursor = body["next"]
        if cursor is None:
            return out


async def test_room_info_and_the_paged_room_list_count_every_instance(env):
    async with instances(3, env) as (a, b, c), httpx.AsyncClient(timeout=t(10)) as http:
        async with (
            WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ana,
            WSClient.connect(f"{b.ws_url}?token={token('bob')}") as bob,
            WSClient.connect(f"{c.ws_url}?token={token('ana')}") as ana2,
            SSEClient.open(f"{c.url}/v1/rooms/hall/events?token={token('cy')}"),
        ):
            await ana.subscribe("hall")
            await bob.subscribe("hall")
            await ana2.subscribe("hall")
            for room in ("k1", "k2", "k3", "k4"):
                await bob.subscribe(room)
            await ana.subscribe("k4")
            for n in range(3):
                await post(http, b.url, "hall", f"m{n}")
            await post(http, a.url, "k2", "x")

            want = {"room": "hall", "subscribers": 4, "presence": 3, "latest_seq": 3}
            for inst in (a, b, c):  # the same answer on every instance
                await eventually(
                    lambda inst=inst: _equal(info(http, inst.url, "hall"), want), timeout=15
                )
            assert await info(http, a.url, "empty") == {
                "room": "empty",
                "subscribers": 0,
                "presence": 0,
                "latest_seq": 0,
            }

            expected = [
                {"room": "hall", "subscribers": 4, "latest_seq": 3},
                {"room": "k1", "subscribers": 1, "latest_seq": 0},
                {"room": "k2", "subscribers": 1, "latest_seq": 1},
                {"room": "k3", "subscribers": 1, "latest_seq": 0},
                {"room": "k4", "subscribers": 2, "latest_seq": 0},
            ]
            await eventually(lambda: _equal(all_rooms(http, c.url, 2), expected), timeout=15)
            assert await all_rooms(http, a.url, 1000) == expected
            r = await http.get(
                f"{a.url}/v1/server/rooms", headers=API, params={"limit": 2, "cursor": "k2"}
            )
            assert r.json() == {"rooms": expected[3:], "next": None}

        # every connection gone: no active room is left anywhere
        await eventually(lambda: _equal(all_rooms(http, b.url, 10), []), timeout=15)
        assert (await info(http, a.url, "hall"))["latest_seq"] == 3


async def _equal(result: Any, want: Any) -> bool:
    return await result == want  # type: ignore[no-any-return]


async def history(http: httpx.AsyncClient, base: str, room: str, **params: Any) -> list[int]:
    r = await http.get(f"{base}/v1/rooms/{room}/messages", params=params, headers=user("reader"))
    assert r.status_code == 200, r.text
    return [m["seq"] for m in r.json()["messages"]]


async def test_purge_removes_history_everywhere_tells_subscribers_and_keeps_seqs(env):
    room = "mod.room"
    async with instances(3, env) as (a, b, c), httpx.AsyncClient(timeout=t(10)) as http:
        async with (
            WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ws,
            SSEClient.open(f"{b.url}/v1/rooms/{room}/events?token={token('bob')}") as sse,
        ):
            await ws.subscribe(room)
            for n in range(5):
                await post(http, c.url, room, f"bad {n}")
            await post(http, c.url, "other", "kept")
            assert await ws.messages(room, 5) == [1, 2, 3, 4, 5]
            await sse.wait_for(5)
            for inst in (a, b, c):  # warm: the Redis page and each instance's window
                assert await history(http, inst.url, room) == [1, 2, 3, 4, 5]
                assert await history(http, inst.url, room) == [1, 2, 3, 4, 5]

            r = await http.delete(f"{c.url}/v1/server/rooms/{room}/messages", headers=API)
            assert r.status_code == 200, r.text
            assert r.json() == {"room": room, "removed": 5}
            # at once, on every instance: no purged message is served
            for inst in (a, b, c):
                assert await history(http, inst.url, room) == []
                assert await history(http, inst.url, room, after=0) == []
            assert await history(http, a.url, "other") == [1]
            # subscribers are told, and stay subscribed
            assert await ws.expect("history_purged") == {"type": "history_purged", "room": room}
            await eventually(lambda: named(sse, "history_purged") == [{"room": room}])

            # the counter goes on: a purged seq is never handed out again
            assert (await post(http, a.url, room, "fresh"))["seq"] == 6
            assert await ws.messages(room, 6) == [1, 2, 3, 4, 5, 6]
            assert await sse.wait_for(6) == [1, 2, 3, 4, 5, 6]
            for inst in (a, b, c):
                assert await history(http, inst.url, room) == [6]
            assert (await info(http, b.url, room))["latest_seq"] == 6

        # a resume from below the purge gets nothing for the removed seqs, no error,
        # then what came after
        async with (
            WSClient.connect(f"{b.ws_url}?token={token('ana')}") as ws2,
            SSEClient.open(
                f"{c.url}/v1/rooms/{room}/events?token={token('bob')}",
                headers={"Last-Event-ID": "2"},
            ) as sse2,
        ):
            assert (await ws2.subscribe(room, since=2))["seq"] == 6
            assert await ws2.messages(room, 1) == [6]
            assert await sse2.wait_for(1) == [6]
            await post(http, b.url, room, "later")
            assert await ws2.messages(room, 2) == [6, 7]
            assert await sse2.wait_for(2) == [6, 7]
            assert not any(f.get("type") == "error" for f in ws2.frames)

        r = await http.delete(f"{a.url}/v1/server/rooms/{room}/messages", headers=API)
        assert r.json() == {"room": room, "removed": 2}
        r = await http.delete(f"{b.url}/v1/server/rooms/{room}/messages", headers=API)
        assert r.json() == {"room": room, "removed": 0}
        assert (await post(http, c.url, room, "again"))["seq"] == 8


async def test_broadcast_reaches_its_rooms_on_every_instance(env):
    async with instances(3, env) as (a, b, c), httpx.AsyncClient(timeout=t(10)) as http:
        async with (
            WSClient.connect(f"{a.ws_url}?token={token('ana')}") as wa,
            WSClient.connect(f"{b.ws_url}?token={token('bob')}") as wb,
            SSEClient.open(f"{c.url}/v1/rooms/z/events?token={token('cy')}") as sz,
        ):
            await wa.subscribe("x")
            await wa.subscribe("left.out")
            await wb.subscribe("y")
            # as many rooms as one call may name, three of them held somewhere
            rooms = ["x", "y", "z"] + [f"quiet{i}" for i in range(97)]
            r = await http.post(
                f"{b.url}/v1/server/broadcast",
                headers=API,
                json={"rooms": rooms, "event": "maintenance", "data": {"in_s": 60}},
            )
            assert r.status_code == 202, r.text
            assert r.json()["rooms"] == 100
            assert await wa.expect("event") == {
                "type": "event",
                "room": "x",
                "event": "maintenance",
                "data": {"in_s": 60},
            }
            assert await wb.expect("event") == {
                "type": "event",
                "room": "y",
                "event": "maintenance",
                "data": {"in_s": 60},
            }
            await eventually(
                lambda: named(sz, "maintenance") == [{"room": "z", "data": {"in_s": 60}}]
            )
            await wa.send({"type": "ping"})
            await wa.expect("pong")
            assert [f for f in wa.frames if f.get("type") == "event"] == [
                {"type": "event", "room": "x", "event": "maintenance", "data": {"in_s": 60}}
            ]


ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/server/disconnect", {"user": "ana"}),
    ("POST", "/v1/server/unsubscribe", {"user": "ana", "room": "r"}),
    ("GET", "/v1/server/rooms", None),
    ("GET", "/v1/server/rooms/r", None),
    ("DELETE", "/v1/server/rooms/r/messages", None),
    ("POST", "/v1/server/broadcast", {"rooms": ["r"], "event": "e"}),
]

BAD: list[tuple[str, str, Any, str]] = [
    ("POST", "/v1/server/disconnect", {}, "user"),
    ("POST", "/v1/server/disconnect", {"user": ""}, "user"),
    ("POST", "/v1/server/disconnect", {"user": 7}, "user"),
    ("POST", "/v1/server/disconnect", {"user": "a" * 129}, "user"),
    ("POST", "/v1/server/disconnect", {"user": "ana", "reason": "é" * 61}, "reason"),
    ("POST", "/v1/server/disconnect", {"user": "ana", "reason": 5}, "reason"),
    ("POST", "/v1/server/disconnect", {"user": "ana", "extra": 1}, None),
    ("POST", "/v1/server/unsubscribe", {"user": "ana"}, "room"),
    ("POST", "/v1/server/unsubscribe", {"user": "ana", "room": "bad room"}, "room"),
    ("GET", "/v1/server/rooms?limit=0", None, "limit"),
    ("GET", "/v1/server/rooms?limit=1001", None, "limit"),
    ("GET", "/v1/server/rooms?limit=x", None, "limit"),
    ("GET", "/v1/server/rooms?cursor=no%20room", None, "cursor"),
    ("GET", "/v1/server/rooms?page=2", None, None),
    ("GET", "/v1/server/rooms/bad%20room", None, "room"),
    ("DELETE", "/v1/server/rooms/bad%20room/messages", None, "room"),
    ("DELETE", "/v1/server/rooms/r/messages?before=3", None, None),
    ("POST", "/v1/server/broadcast", {"rooms": [], "event": "e"}, "rooms"),
    ("POST", "/v1/server/broadcast", {"rooms": "r", "event": "e"}, "rooms"),
    (
        "POST",
        "/v1/server/broadcast",
        {"rooms": [f"r{i}" for i in range(101)], "event": "e"},
        "rooms",
    ),
    ("POST", "/v1/server/broadcast", {"rooms": ["r", "r"], "event": "e"}, "rooms"),
    ("POST", "/v1/server/broadcast", {"rooms": ["r", 3], "event": "e"}, "room"),
    ("POST", "/v1/server/broadcast", {"rooms": ["r"], "event": "history_purged"}, "event"),
    ("POST", "/v1/server/broadcast", {"rooms": ["r"], "event": "e", "data": [1]}, "data"),
]


async def check_refusals(http: httpx.AsyncClient, base: str) -> None:
    for method, path, body in ROUTES:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, user("ana")):
            r = await http.request(method, base + path, json=body, headers=headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
    for method, path, body, field in BAD:
        r = await http.request(method, base + path, json=body, headers=API)
        assert r.status_code == 422, (method, path, body, r.text)
        error = r.json()["error"]
        assert error["code"] == "invalid_request" and error["message"]
        if field is not None:
            assert error["field"] == field, (path, body, error)
    r = await http.post(base + "/v1/server/disconnect", content=b"{nope", headers=API)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = await http.post(base + "/v1/server/broadcast", content=b"[]", headers=API)
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request"


async def test_every_route_refuses_a_missing_or_wrong_key_and_bad_input(env):
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        await post(http, gw.url, "r", "kept")
        await check_refusals(http, gw.url)
        # nothing was changed by any refused call
        assert await history(http, gw.url, "r") == [1]
        spec = (await http.get(gw.url + "/openapi.json")).json()
        for method, path, _ in ROUTES:
            templated = (
                path.replace("/r/", "/{room}/")
                if path.endswith("messages")
                else ("/v1/server/rooms/{room}" if path == "/v1/server/rooms/r" else path)
            )
            assert method.lower() in spec["paths"][templated]


async def test_without_configured_keys_the_server_api_is_closed(gateway_env):
    async with instances(1, gateway_env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        for method, path, body in ROUTES:
            r = await http.request(
                method, gw.url + path, json=body, headers={"Authorization": "Bearer anything"}
            )
            assert r.status_code == 401, (path, r.text)
            assert "API_KEYS" in r.json()["error"]["message"]


async def test_memory_mode_single_instance(tmp_path):
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/s.db",
        "REDIS_URL": "memory://",
        "API_KEYS": KEY,
        "LOG_LEVEL": "warning",
    }
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        async with (
            WSClient.connect(gw.ws_url + "?user=ana") as ana,
            WSClient.connect(gw.ws_url + "?user=bob") as bob,
            WSClient.connect(gw.ws_url) as anonymous,
            SSEClient.open(f"{gw.url}/v1/rooms/r/events?user=ana") as ana_sse,
            SSEClient.open(f"{gw.url}/v1/rooms/r/events?user=bob") as bob_sse,
        ):
            for ws in (ana, bob, anonymous):
                await ws.subscribe("r")
                await ws.subscribe("s")
            for n in range(3):
                r = await http.post(
                    f"{gw.url}/v1/rooms/r/messages", json={"text": f"m{n}", "author": "x"}
                )
                assert r.status_code == 201
            assert await anonymous.messages("r", 3) == [1, 2, 3]

            assert (await info(http, gw.url, "r")) == {
                "room": "r",
                "subscribers": 5,
                "presence": 2,
                "latest_seq": 3,
            }
            assert await all_rooms(http, gw.url, 1) == [
                {"room": "r", "subscribers": 5, "latest_seq": 3},
                {"room": "s", "subscribers": 3, "latest_seq": 0},
            ]

            r = await http.post(
                f"{gw.url}/v1/server/unsubscribe", headers=API, json={"user": "bob", "room": "r"}
            )
            assert r.status_code == 202
            assert await bob.expect("unsubscribed") == {
                "type": "unsubscribed",
                "room": "r",
                "reason": "",
            }
            await ended(bob_sse)

            r = await http.delete(f"{gw.url}/v1/server/rooms/r/messages", headers=API)
            assert r.json() == {"room": "r", "removed": 3}
            assert await history(http, gw.url, "r") == []
            assert await anonymous.expect("history_purged") == {
                "type": "history_purged",
                "room": "r",
            }
            await eventually(lambda: named(ana_sse, "history_purged") == [{"room": "r"}])

            r = await http.post(
                f"{gw.url}/v1/server/broadcast",
                headers=API,
                json={"rooms": ["r", "s"], "event": "note", "data": {"n": 1}},
            )
            assert r.status_code == 202
            frames = [await anonymous.expect("event"), await anonymous.expect("event")]
            assert sorted(f["room"] for f in frames) == ["r", "s"]

            r = await http.post(
                f"{gw.url}/v1/server/disconnect", headers=API, json={"user": "ana", "reason": "bye"}
            )
            assert r.status_code == 202
            assert (await closed_with(ana)).code == 4001
            await ended(ana_sse)
            assert named(ana_sse, "disconnected") == [{"reason": "bye"}]
            # others stay: a connection without a user is never addressed
            await anonymous.send({"type": "ping"})
            await anonymous.expect("pong")
            r = await http.post(f"{gw.url}/v1/rooms/r/messages", json={"text": "n", "author": "x"})
            assert r.json()["seq"] == 4
            assert await anonymous.messages("r", 4) == [1, 2, 3, 4]
        await check_refusals(http, gw.url)


class PausedStore(PostgresStore):
    """A real store whose history reads can be held at the start, to place a purge
    between a cold load's store read and its cache write."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.hold: asyncio.Event | None = None
        self.reading = asyncio.Event()

    async def history(self, room: str, **kwargs: Any) -> Page:
        page = await super().history(room, **kwargs)
        if self.hold is not None:
            self.reading.set()
            await self.hold.wait()
        return page


async def test_a_load_that_read_before_a_purge_does_not_cache_what_it_read(pg_url, redis_prefix):
    store = PausedStore(pg_url)
    await store.start()
    await store.migrate()
    client = aioredis.from_url(REDIS_URL)
    try:
        cache = RedisHistoryCache(store, RedisContext.of(client), prefix=redis_prefix, ttl=60)
        for n in range(3):
            await cache.committed((await store.append("p", "a", f"m{n}"))[0])
        store.hold = asyncio.Event()
        load = asyncio.ensure_future(cache.history("p"))
        await asyncio.wait_for(store.reading.wait(), t(10))  # it read m0..m2
        assert await store.purge_room("p") == 3
        await cache.purged("p")
        store.hold.set()
        assert [m.seq for m in (await load).messages] == [1, 2, 3]  # began before the purge
        store.hold = None
        # the stale page was not cached: the next read (on any instance) is the store's
        assert (await cache.history("p")).messages == []
        other = RedisHistoryCache(store, RedisContext.of(client), prefix=redis_prefix, ttl=60)
        assert (await other.history("p")).messages == []
        assert await client.exists(f"{redis_prefix}{{p}}:page") == 0
    finally:
        await client.aclose()
        await store.close()


async def test_a_purge_stops_other_instances_serving_their_windows_before_they_hear_of_it(
    pg_url, redis_prefix
):
    store = PostgresStore(pg_url)
    await store.start()
    await store.migrate()
    client = aioredis.from_url(REDIS_URL)
    try:
        here, there = (
            RedisHistoryCache(store, RedisContext.of(client), prefix=redis_prefix, ttl=60)
            for _ in range(2)
        )
        for n in range(3):
            await here.committed((await store.append("w", "a", f"m{n}"))[0])
        for cache in (here, there, there):  # `there` now holds the window in memory
            assert [m.seq for m in (await cache.history("w")).messages] == [1, 2, 3]
        assert await store.purge_room("w") == 3
        await here.purged("w")
        # `there` was not told (its control message may still be on the way)
        assert (await there.history("w")).messages == []
        await here.committed((await store.append("w", "a", "new"))[0])
        assert [m.seq for m in (await there.history("w")).messages] == [4]
        assert [m.seq for m in (await here.history("w")).messages] == [4]
    finally:
        await client.aclose()
        await store.close()


async def test_commands_reach_every_instance_over_a_redis_cluster(env):
    servers = RedisClusterServers(3).start()
    try:
        cluster_env = {**env, "REDIS_URL": servers.url}
        async with instances(2, cluster_env) as (a, b), httpx.AsyncClient(timeout=t(10)) as http:
            async with (
                WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ana_a,
                WSClient.connect(f"{b.ws_url}?token={token('ana')}") as ana_b,
                WSClient.connect(f"{b.ws_url}?token={token('bob')}") as bob,
            ):
                await bob.subscribe("c.room")
                await post(http, a.url, "c.room", "x")
                await bob.messages("c.room", 1)
                r = await http.delete(f"{a.url}/v1/server/rooms/c.room/messages", headers=API)
                assert r.json() == {"room": "c.room", "removed": 1}
                assert await bob.expect("history_purged") == {
                    "type": "history_purged",
                    "room": "c.room",
                }
                assert await history(http, b.url, "c.room") == []
                r = await http.post(
                    f"{b.url}/v1/server/disconnect",
                    headers=API,
                    json={"user": "ana", "reason": "r"},
                )
                assert r.status_code == 202
                for ws in (ana_a, ana_b):
                    assert (await closed_with(ws)).code == 4001
                await bob.send({"type": "ping"})
                await bob.expect("pong")
    finally:
        servers.stop()


async def test_with_redis_down_commands_are_refused_and_a_repeat_completes(env):
    redis = RedisServer()
    redis.start()
    try:
        async with (
            instances(1, {**env, "REDIS_URL": redis.url}) as (gw,),
            httpx.AsyncClient(timeout=t(20)) as http,
        ):
            await post(http, gw.url, "d", "x")
            assert await history(http, gw.url, "d") == [1]
            redis.stop()
            r = await http.post(f"{gw.url}/v1/server/disconnect", headers=API, json={"user": "ana"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
            r = await http.post(
                f"{gw.url}/v1/server/broadcast", headers=API, json={"rooms": ["d"], "event": "e"}
            )
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
            # the store purged, but Redis could not be told: said so, with the count
            r = await http.delete(f"{gw.url}/v1/server/rooms/d/messages", headers=API)
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "unavailable"
            assert r.json()["error"]["removed"] == 1

            redis.start()
            await eventually(lambda: _ready(http, gw.url), timeout=20)
            r = await http.delete(f"{gw.url}/v1/server/rooms/d/messages", headers=API)
            assert r.status_code == 200 and r.json() == {"room": "d", "removed": 0}
            assert await history(http, gw.url, "d") == []
            assert "Traceback" not in gw.log()
    finally:
        redis.stop()


async def _ready(http: httpx.AsyncClient, base: str) -> bool:
    return (await http.get(base + "/readyz")).status_code == 200
