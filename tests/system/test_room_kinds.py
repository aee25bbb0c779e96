"""Room kinds by namespace (NAMESPACES_FILE) on real gateway processes sharing one
Postgres and one Redis: ephemeral rooms fan out emits and store nothing; stored
operations there are refused with 409 wrong_room_kind; client_publish, presence
and rate_limit apply per namespace; rooms outside any namespace are as in v1."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import asyncpg
import httpx
import pytest

from tests.harness import (
    RedisServer,
    SSEClient,
    WSClient,
    embedded_env,
    eventually,
    instances,
    namespaces_env,
    post,
    signed,
)
from tests.system.test_startup_errors import run

SECRET = "room-kinds-test-secret-0123456789abcdef"
KEY = "backend-key-1"
API = {"Authorization": f"Bearer {KEY}"}

NAMESPACES = """
[namespaces.live]
kind = "ephemeral"

[namespaces.ticker]
kind = "ephemeral"
client_publish = false
presence = false

[namespaces.slow]
kind = "ephemeral"
rate_limit = "2/1h"

[namespaces.chat]
kind = "stored"
"""


async def event_frame(ws: WSClient) -> dict:
    """The first event frame ``ws`` has received or receives next."""
    seen = [f for f in ws.frames if f.get("type") == "event"]
    return seen[0] if seen else await ws.expect("event")


def token(sub: str) -> str:
    return signed(sub, SECRET)


def user(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub)}"}


@pytest.fixture
def env(gateway_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return namespaces_env(gateway_env, tmp_path, NAMESPACES, SECRET, KEY)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("[namespaces.x\nkind = 1", "is not valid TOML"),
        ('[namespaces.x]\ncolour = "red"', "unknown option 'colour'"),
        ('[namespaces.x]\nkind = "fleeting"', "kind='fleeting'"),
        ('[namespaces.x]\npresence = "no"', "presence must be a TOML bool"),
        ('[namespaces.x]\nrate_limit = "lots"', "rate_limit='lots' is not CAPACITY/PERIOD"),
        ("[namespaces.x]\nconflate_ms = -1", "conflate_ms must be 0..60000"),
        ('[namespaces."a:b"]\nkind = "ephemeral"', "without ':'"),
        ('[rooms.x]\nkind = "ephemeral"', "unknown table 'rooms'"),
        (None, "cannot be read"),
    ],
)
def test_a_bad_namespaces_file_is_one_line_at_start(tmp_path, content, expected):
    path = tmp_path / "namespaces.toml"
    if content is not None:
        path.write_text(content)
    proc = run("serve", env=embedded_env(tmp_path, NAMESPACES_FILE=str(path)), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("chat-gateway: configuration error: NAMESPACES_FILE="), lines[0]
    assert expected in lines[0], lines[0]


async def test_emit_fans_out_over_instances_and_stores_nothing(env, pg_url):
    room = "live:match-1"
    async with instances(2, env) as (a, b), httpx.AsyncClient(timeout=10) as http:
        async with (
            WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ana,
            WSClient.connect(f"{b.ws_url}?token={token('bob')}") as bob,
            SSEClient.open(f"{b.url}/v1/rooms/{room}/events", user("cy")) as cy,
        ):
            assert (await ana.subscribe(room))["kind"] == "ephemeral"
            await bob.subscribe(room)

            async def everyone_there() -> bool:
                # cy's SSE stream is held once its subscription is counted on b
                r = await http.get(f"{b.url}/v1/server/rooms/{room}", headers=API)
                return r.status_code == 200 and r.json().get("subscribers", 0) >= 2

            await eventually(everyone_there)
            await ana.send(
                {"type": "emit", "room": room, "event": "goal", "data": {"min": 9}, "ref": 1}
            )
            assert await ana.expect("ack") == {"type": "ack", "ref": 1}
            expected = {"type": "event", "room": room, "event": "goal", "data": {"min": 9}}
            # the emitter's own copy may come before or after its ack
            assert await event_frame(ana) == expected
            assert await event_frame(bob) == expected

            def cy_got() -> list[dict]:
                return [e for e in cy.events if e.get("event") == "goal"]

            got = await eventually(cy_got)
            assert got[0]["json"] == {"room": room, "data": {"min": 9}}
            assert "id" not in got[0]

            # a backend's POST /v1/publish reaches them the same way
            r = await http.post(
                f"{a.url}/v1/publish",
                json={"room": room, "event": "card", "data": {"p": 4}},
                headers=API,
            )
            assert r.status_code == 202, r.text
            assert (await bob.expect("event"))["event"] == "card"

        # nothing stored: history refuses, the messages table has no row
        r = await http.get(f"{a.url}/v1/rooms/{room}/messages", headers=user("ana"))
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "wrong_room_kind"
        assert r.json()["error"]["kind"] == "ephemeral"
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM messages") == 0
        assert await conn.fetchval("SELECT count(*) FROM rooms WHERE room = $1", room) == 0
    finally:
        await conn.close()


async def test_events_reach_the_publishing_instance_first_and_each_subscriber_once(env):
    """An instance gives what it publishes to its own subscribers at once and skips
    the broker's copy; the other instance's subscribers get it through Redis. Each
    has every event once, in order. With Redis gone, a publish still reaches the
    publishing instance's subscribers, and is answered 503 saying only they got it."""
    room = "live:once"
    rs = RedisServer()
    rs.start()
    try:
        async with (
            instances(2, {**env, "REDIS_URL": rs.url}) as (a, b),
            httpx.AsyncClient(timeout=10) as http,
            WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ana,
            WSClient.connect(f"{b.ws_url}?token={token('bob')}") as bob,
        ):
            await ana.subscribe(room)
            await bob.subscribe(room)

            def got(ws: WSClient) -> list[int]:
                return [f["data"]["n"] for f in ws.frames if f.get("type") == "event"]

            readers = [asyncio.create_task(ws.read_all()) for ws in (ana, bob)]
            for n in range(20):
                await ana.send({"type": "emit", "room": room, "event": "tick", "data": {"n": n}})
            await eventually(lambda: len(got(bob)) >= 20 and len(got(ana)) >= 20)
            await asyncio.sleep(0.3)  # time for any second copy to arrive
            assert got(ana) == got(bob) == list(range(20))

            rs.stop()
            r = await eventually(
                lambda: _publish_refused(http, a.url, room), timeout=15, interval=0.2
            )
            assert r.json()["error"]["code"] == "unavailable"
            assert "this instance's subscribers only" in r.json()["error"]["message"]
            await eventually(lambda: got(ana)[-1] == 99)
            assert 99 not in got(bob)
            for reader in readers:
                reader.cancel()
    finally:
        rs.stop()


async def _publish_refused(http: httpx.AsyncClient, base: str, room: str) -> httpx.Response | None:
    r = await http.post(
        f"{base}/v1/publish", json={"room": room, "event": "tick", "data": {"n": 99}}, headers=API
    )
    return r if r.status_code == 503 else None


async def test_client_publish_false_takes_api_keys_only(env):
    room = "ticker:btc"
    async with instances(1, env) as (a,), httpx.AsyncClient(timeout=10) as http:
        async with WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ana:
            await ana.subscribe(room)
            await ana.send({"type": "emit", "room": room, "event": "px", "ref": "e1"})
            refused = await ana.expect("error")
            assert refused["ref"] == "e1" and refused["code"] == "forbidden", refused
            assert "client_publish" in refused["message"]
            r = await http.post(
                f"{a.url}/v1/publish",
                json={"room": room, "event": "px", "data": {"v": 1}},
                headers=API,
            )
            assert r.status_code == 202, r.text
            frame = await event_frame(ana)
            assert frame["event"] == "px" and frame["data"] == {"v": 1}
            # the refused emit never went out: the first event is the backend's
            assert [f["event"] for f in ana.frames if f.get("type") == "event"] == ["px"]


async def test_presence_false_sends_no_presence(env):
    async with instances(1, env) as (a,), httpx.AsyncClient(timeout=10) as http:
        async with WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ana:
            reader = asyncio.create_task(ana.read_all())
            try:
                for room in ("ticker:eth", "live:eth"):
                    await ana.send({"type": "subscribe", "room": room})
                async with WSClient.connect(f"{a.ws_url}?token={token('bob')}") as bob:
                    for room in ("ticker:eth", "live:eth"):
                        await bob.subscribe(room)

                    def presence_of(room: str) -> list[dict]:
                        return [
                            f
                            for f in ana.frames
                            if f.get("type") == "presence" and f.get("room") == room
                        ]

                    # in live (presence on) bob's join is seen; by then, had ticker
                    # any presence, its join (sent first) would have been too
                    await eventually(lambda: presence_of("live:eth"))
                    r = await http.get(f"{a.url}/v1/rooms/ticker:eth/presence", headers=user("x"))
                    assert r.json()["users"] == []
                    r = await http.get(f"{a.url}/v1/rooms/live:eth/presence", headers=user("x"))
                    assert r.json()["users"] == ["ana", "bob"]
                await eventually(
                    lambda: any(f["action"] == "leave" for f in presence_of("live:eth"))
                )
                assert presence_of("ticker:eth") == []
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader


async def test_a_namespace_rate_limit_overrides_rate_limit(env):
    async with instances(1, env) as (a,), httpx.AsyncClient(timeout=10) as http:
        async with WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ana:
            for ref in (1, 2):
                await ana.send({"type": "emit", "room": "slow:x", "event": "e", "ref": ref})
                assert await ana.expect("ack") == {"type": "ack", "ref": ref}
            await ana.send({"type": "emit", "room": "slow:x", "event": "e", "ref": 3})
            refused = await ana.expect("error")
            assert refused["code"] == "rate_limited" and refused["ref"] == 3, refused
            # RATE_LIMIT itself (generous here) still holds elsewhere
            await ana.send({"type": "emit", "room": "live:x", "event": "e", "ref": 4})
            assert await ana.expect("ack") == {"type": "ack", "ref": 4}
            r = await post(http, a.url, "lobby", "hi", headers=user("ana"))
            assert r.status_code == 201, r.text


async def test_every_stored_operation_is_refused_in_an_ephemeral_room(env):
    room = "live:r"
    ana = user("ana")
    async with instances(1, env) as (a,), httpx.AsyncClient(timeout=10) as http:
        calls = [
            http.get(f"{a.url}/v1/rooms/{room}/messages", headers=ana),
            http.post(f"{a.url}/v1/rooms/{room}/messages", json={"text": "x"}, headers=ana),
            http.patch(f"{a.url}/v1/rooms/{room}/messages/1", json={"text": "y"}, headers=ana),
            http.delete(f"{a.url}/v1/rooms/{room}/messages/1", headers=ana),
            http.post(f"{a.url}/v1/rooms/{room}/read", json={"seq": 1}, headers=ana),
            http.get(f"{a.url}/v1/rooms/{room}/read", headers=ana),
        ]
        for call in calls:
            r = await call
            assert r.status_code == 409, (r.request.method, r.request.url, r.text)
            assert r.json()["error"]["code"] == "wrong_room_kind"
        async with WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ws:
            frames = [
                {"type": "publish", "room": room, "text": "x", "ref": 1},
                {"type": "edit", "room": room, "seq": 1, "text": "y", "ref": 2},
                {"type": "delete", "room": room, "seq": 1, "ref": 3},
                {"type": "read", "room": room, "seq": 1, "ref": 4},
            ]
            for frame in frames:
                await ws.send(frame)
                refused = await ws.expect("error")
                assert refused["ref"] == frame["ref"], refused
                assert refused["code"] == "wrong_room_kind", refused
            # and an emit is refused in a stored room, named or not
            for stored in ("chat:r", "lobby"):
                await ws.send({"type": "emit", "room": stored, "event": "e", "ref": 5})
                refused = await ws.expect("error")
                assert refused["code"] == "wrong_room_kind" and refused["kind"] == "stored"


async def test_rooms_outside_namespaces_are_unchanged(env):
    async with instances(2, env) as (a, b), httpx.AsyncClient(timeout=10) as http:
        async with WSClient.connect(f"{b.ws_url}?token={token('bob')}") as bob:
            for room in ("lobby", "chat:general", "other:room"):
                assert (await bob.subscribe(room))["kind"] == "stored"
                r = await post(http, a.url, room, "hello", headers=user("ana"))
                assert r.status_code == 201, r.text
                assert await bob.messages(room, 1) == [1]
                r = await http.get(f"{a.url}/v1/rooms/{room}/messages", headers=user("ana"))
                assert [m["text"] for m in r.json()["messages"]] == ["hello"]


async def test_bans_and_mutes_apply_to_emits(env):
    async with instances(2, env) as (a, b), httpx.AsyncClient(timeout=10) as http:
        async with (
            WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ana,
            WSClient.connect(f"{a.ws_url}?token={token('bob')}") as bob,
        ):
            for user, kind in (("ana", "mutes"), ("bob", "bans")):
                r = await http.post(
                    f"{b.url}/v1/rooms/live:mod/{kind}", json={"user": user}, headers=API
                )
                assert r.status_code in (200, 201), r.text

            async def refused(ws: WSClient, code: str) -> bool:
                await ws.send({"type": "emit", "room": "live:mod", "event": "e", "ref": "m"})
                while True:  # its answer: an ack (not refused yet) or the error
                    frame = await ws.recv()
                    if frame.get("ref") == "m":
                        return bool(frame.get("code") == code)

            # the instance that did not take the action learns it too
            await eventually(lambda: refused(ana, "muted"))
            await eventually(lambda: refused(bob, "banned"))
            # elsewhere both still emit
            await ana.send({"type": "emit", "room": "live:other", "event": "e", "ref": 1})
            assert await ana.expect("ack") == {"type": "ack", "ref": 1}
