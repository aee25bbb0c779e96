"""State rooms on real gateway processes sharing one Postgres and one Redis: the
routes and their refusals, the snapshot then live writes over WebSocket and SSE,
resume across an overwrite and a delete, two instances converging, conflation,
the per-instance snapshot read shared by concurrent subscribers, GET's answer
(one store read for many at once, every write acknowledged before it in it, on
either instance), and the SQL functions a backend writes with inside its own
transaction."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

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
    signed,
)
from tests.metrics_text import sample

SECRET = "state-rooms-test-secret-0123456789abcdef"
KEY = "backend-key-1"
API = {"Authorization": f"Bearer {KEY}"}

NAMESPACES = """
[namespaces.board]
kind = "state"

[namespaces.ticker]
kind = "state"
client_publish = false

[namespaces.dash]
kind = "state"
conflate_ms = 200

[namespaces.live]
kind = "ephemeral"

[namespaces.tight]
kind = "state"
rate_limit = "2/1h"
"""


def token(sub: str) -> str:
    return signed(sub, SECRET)


def user(sub: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub)}"}


@pytest.fixture
def env(gateway_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    return namespaces_env(gateway_env, tmp_path, NAMESPACES, SECRET, KEY)


def values_of(snapshot: dict[str, Any]) -> dict[str, Any]:
    return {k: v["value"] for k, v in snapshot["values"].items()}


class Held:
    """What a subscriber holds after applying its frames in order; checks that no
    key ever goes back to an older value and no frame repeats an older seq."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.seqs: dict[str, int] = {}
        self.seq = 0
        self.frames = 0

    def apply(self, frame: dict[str, Any]) -> None:
        kind = frame.get("type") or frame.get("event")
        if kind == "snapshot":
            self.values = values_of(frame)
            self.seqs = {k: v["seq"] for k, v in frame["values"].items()}
            self.seq = frame["seq"]
            return
        if kind != "state":
            return
        self.frames += 1
        key, seq = frame["key"], frame["seq"]
        assert seq > self.seq, f"seq {seq} after {self.seq}"
        assert seq > self.seqs.get(key, 0), f"{key}: seq {seq} after {self.seqs[key]}"
        self.seq = seq
        self.seqs[key] = seq
        if frame.get("deleted"):
            self.values.pop(key, None)
        else:
            self.values[key] = frame["value"]


async def held_by(ws: WSClient, room: str, until: Any, timeout: float = 15) -> Held:
    """Frames of ``room`` applied in order until ``until(held)`` holds."""
    held = Held()
    for frame in ws.frames:
        if frame.get("room") == room:
            held.apply(frame)
    deadline = time.monotonic() + timeout
    while not until(held):
        frame = await ws.recv(max(0.05, deadline - time.monotonic()))
        if frame.get("room") == room:
            held.apply(frame)
    return held


async def test_routes_write_read_and_refuse(env):
    room = "board:b1"
    async with instances(1, env) as (a,), httpx.AsyncClient(base_url=a.url, timeout=10) as http:
        r = await http.put(
            f"/v1/rooms/{room}/state/score", json={"value": {"home": 1}}, headers=API
        )
        assert r.status_code == 200, r.text
        put = r.json()
        assert put["room"] == room and put["key"] == "score" and put["value"] == {"home": 1}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", put["updated_at"])
        first = put["seq"]

        # a user writes too (client_publish defaults to true); JSON null is a value
        r = await http.put(
            f"/v1/rooms/{room}/state/note", json={"value": None}, headers=user("ana")
        )
        assert r.status_code == 200, r.text
        assert r.json()["seq"] == first + 1 and r.json()["value"] is None

        r = await http.patch(
            f"/v1/rooms/{room}/state",
            json={"set": {"a": 1, "b": [1, 2], "c": "x"}, "delete": ["note"]},
            headers=API,
        )
        assert r.status_code == 200, r.text
        patched = r.json()
        seqs = [w["seq"] for w in patched["writes"]]
        assert seqs == list(range(first + 2, first + 6)), "contiguous, in order"
        assert patched["seq"] == seqs[-1]
        assert [w["key"] for w in patched["writes"]] == ["a", "b", "c", "note"]
        assert patched["writes"][-1]["deleted"] is True

        r = await http.delete(f"/v1/rooms/{room}/state/c", headers=API)
        assert r.status_code == 200, r.text
        assert r.json()["deleted"] is True and r.json()["seq"] == seqs[-1] + 1

        r = await http.get(f"/v1/rooms/{room}/state", headers=user("bob"))
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["seq"] == seqs[-1] + 1
        assert values_of(got) == {"score": {"home": 1}, "a": 1, "b": [1, 2]}
        assert got["values"]["a"]["seq"] == first + 2

        # a bad entry writes nothing: the PATCH is refused whole
        before = got
        for body in (
            {"set": {"a": 2, "bad key": 1}},
            {"set": {"a": 2, "big": "x" * 20000}},
            {"set": {}},
            {},
            {"set": {"a": 2}, "other": 1},
        ):
            r = await http.patch(f"/v1/rooms/{room}/state", json=body, headers=API)
            assert r.status_code == 422, (body, r.text)
            assert r.json()["error"]["code"] == "invalid_request"
        r = await http.get(f"/v1/rooms/{room}/state", headers=API)
        assert r.json() == before

        # validation: the key's pattern, the value's presence and size
        r = await http.put(f"/v1/rooms/{room}/state/-x", json={"value": 1}, headers=API)
        assert r.status_code == 422 and r.json()["error"]["field"] == "key"
        r = await http.put(f"/v1/rooms/{room}/state/k", json={}, headers=API)
        assert r.status_code == 422, r.text
        r = await http.put(f"/v1/rooms/{room}/state/k", json={"value": "x" * 17000}, headers=API)
        assert r.status_code == 422 and r.json()["error"]["limit"] == 16384
        r = await http.put(f"/v1/rooms/{room}/state/k", content=b"{", headers=API)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"

        # the wrong kind of room, both ways
        for method, path in (
            ("PUT", "/v1/rooms/lobby/state/k"),
            ("DELETE", "/v1/rooms/live:x/state/k"),
            ("GET", "/v1/rooms/lobby/state"),
        ):
            r = await http.request(method, path, json={"value": 1}, headers=API)
            assert r.status_code == 409, (path, r.text)
            assert r.json()["error"]["code"] == "wrong_room_kind"
        r = await http.post(f"/v1/rooms/{room}/messages", json={"text": "hi"}, headers=user("ana"))
        assert r.status_code == 409 and r.json()["error"]["kind"] == "state"
        r = await http.get(f"/v1/rooms/{room}/messages", headers=user("ana"))
        assert r.status_code == 409 and r.json()["error"]["code"] == "wrong_room_kind"

        # client_publish = false: users may read, not write; API keys write
        r = await http.put("/v1/rooms/ticker:btc/state/p", json={"value": 1}, headers=user("ana"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = await http.put("/v1/rooms/ticker:btc/state/p", json={"value": 1}, headers=API)
        assert r.status_code == 200, r.text
        r = await http.get("/v1/rooms/ticker:btc/state", headers=user("ana"))
        assert values_of(r.json()) == {"p": 1}
        r = await http.put("/v1/rooms/ticker:btc/state/p", json={"value": 1})
        assert r.status_code == 401

        # a banned user may neither write nor read
        r = await http.post(f"/v1/rooms/{room}/bans", json={"user": "eve"}, headers=API)
        assert r.status_code in (200, 201), r.text
        r = await http.put(f"/v1/rooms/{room}/state/k", json={"value": 1}, headers=user("eve"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "banned"
        r = await http.get(f"/v1/rooms/{room}/state", headers=user("eve"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "banned"
        async with WSClient.connect(f"{a.ws_url}?token={token('eve')}") as eve:
            await eve.send({"type": "subscribe", "room": room})
            assert (await eve.expect("error"))["code"] == "banned"


async def test_snapshot_then_live_over_ws_and_sse_and_resume(env):
    room = "board:b2"
    async with instances(1, env) as (a,), httpx.AsyncClient(base_url=a.url, timeout=10) as http:
        await http.patch(f"/v1/rooms/{room}/state", json={"set": {"x": 1, "y": 2}}, headers=API)
        async with (
            WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ws,
            SSEClient.open(f"{a.url}/v1/rooms/{room}/events", user("bob")) as sse,
        ):
            sub = await ws.subscribe(room)
            assert sub["seq"] == 2 and sub["change"] == 0 and sub["kind"] == "state"
            snap = await ws.expect("snapshot")
            assert snap["room"] == room and snap["seq"] == 2
            assert values_of(snap) == {"x": 1, "y": 2}
            first = await eventually(lambda: [e for e in sse.events if e.get("event")])
            assert first[0]["event"] == "snapshot" and first[0]["id"] == "2"
            assert values_of(first[0]["json"]) == {"x": 1, "y": 2}

            await http.put(f"/v1/rooms/{room}/state/x", json={"value": 10}, headers=API)
            await http.delete(f"/v1/rooms/{room}/state/y", headers=API)
            live = await ws.expect("state")
            assert live == {
                "type": "state",
                "room": room,
                "seq": 3,
                "key": "x",
                "value": 10,
                "updated_at": live["updated_at"],
            }
            gone = await ws.expect("state")
            assert gone["seq"] == 4 and gone["key"] == "y" and gone["deleted"] is True
            assert "value" not in gone
            events = await eventually(
                lambda: [e for e in sse.events if e.get("event") == "state"][1:] and sse.events
            )
            states = [e for e in events if e.get("event") == "state"]
            assert [e["id"] for e in states] == ["3", "4"]
            assert states[0]["json"]["value"] == 10 and states[1]["json"]["deleted"] is True

        # more writes while away: an overwrite, a new key, a delete of a new key
        await http.patch(
            f"/v1/rooms/{room}/state", json={"set": {"x": 11, "z": 1, "w": 0}}, headers=API
        )
        await http.put(f"/v1/rooms/{room}/state/x", json={"value": 12}, headers=API)
        await http.delete(f"/v1/rooms/{room}/state/w", headers=API)  # seq 9
        async with WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ws:
            await ws.subscribe(room, since=4)
            got = [await ws.expect("state") for _ in range(3)]
            # each key once, in seq order, the newest value; tombstones as deleted
            assert [(f["key"], f["seq"]) for f in got] == [("z", 6), ("x", 8), ("w", 9)]
            assert got[1]["value"] == 12 and got[2]["deleted"] is True
            await http.put(f"/v1/rooms/{room}/state/z", json={"value": 2}, headers=API)
            nxt = await ws.expect("state")
            assert (nxt["key"], nxt["seq"], nxt["value"]) == ("z", 10, 2)
            assert not [f for f in ws.frames if f.get("type") == "snapshot"]

        # SSE resumes from Last-Event-ID the same way
        async with SSEClient.open(
            f"{a.url}/v1/rooms/{room}/events", {**user("bob"), "Last-Event-ID": "7"}
        ) as sse:
            states = await eventually(
                lambda: (
                    len([e for e in sse.events if e.get("event") == "state"]) >= 3
                    and [e for e in sse.events if e.get("event") == "state"]
                )
            )
            assert [(e["json"]["key"], e["id"]) for e in states] == [
                ("x", "8"),
                ("w", "9"),
                ("z", "10"),
            ]
            assert not [e for e in sse.events if e.get("event") == "snapshot"]


async def test_two_instances_converge_and_writes_across_them(env):
    room = "board:b3"
    async with instances(2, env) as (a, b), httpx.AsyncClient(timeout=10) as http:
        async with WSClient.connect(f"{b.ws_url}?token={token('bob')}") as ws:
            await ws.subscribe(room)
            await ws.expect("snapshot")
            for i in range(30):
                body = {"set": {f"k{i % 5}": i}} if i % 7 else {"delete": [f"k{i % 5}"]}
                r = await http.patch(f"{a.url}/v1/rooms/{room}/state", json=body, headers=API)
                assert r.status_code == 200, r.text
            truth = (await http.get(f"{a.url}/v1/rooms/{room}/state", headers=API)).json()
            held = await held_by(ws, room, lambda h: h.seq >= truth["seq"])
            assert held.values == values_of(truth)
            assert held.frames == 30, "no conflation asked: every write"


async def test_conflation_sends_fewer_frames_never_older_and_converges(env):
    room = "dash:d1"  # the namespace's conflate_ms is 200
    async with instances(1, env) as (a,), httpx.AsyncClient(base_url=a.url, timeout=10) as http:
        async with (
            WSClient.connect(f"{a.ws_url}?token={token('ana')}") as slow,
            WSClient.connect(f"{a.ws_url}?token={token('bob')}") as every,
            WSClient.connect(f"{a.ws_url}?token={token('cy')}") as fast,
            SSEClient.open(f"{a.url}/v1/rooms/{room}/events?conflate_ms=100", user("dee")) as sse,
        ):
            await slow.subscribe(room)  # the namespace's default: 200 ms
            await every.subscribe(room, conflate_ms=0)
            await fast.subscribe(room, conflate_ms=50)
            writes = 0
            for i in range(60):
                r = await http.patch(
                    f"{a.url}/v1/rooms/{room}/state",
                    json={"set": {"price": i, f"k{i % 3}": i}},
                    headers=API,
                )
                assert r.status_code == 200
                writes += 2
            await http.delete(f"/v1/rooms/{room}/state/k0", headers=API)
            writes += 1
            truth = (await http.get(f"/v1/rooms/{room}/state", headers=API)).json()
            done = lambda h: h.seq >= truth["seq"]  # noqa: E731
            got_every = await held_by(every, room, done)
            got_slow = await held_by(slow, room, done)
            got_fast = await held_by(fast, room, done)
            for held in (got_every, got_slow, got_fast):
                assert held.values == values_of(truth)
            assert got_every.frames == writes
            assert got_slow.frames < writes
            assert got_fast.frames < writes

            def sse_held() -> Held | None:
                held = Held()
                for event in sse.events:
                    if event.get("event") in ("snapshot", "state"):
                        held.apply({"event": event["event"], **event["json"]})
                return held if held.seq >= truth["seq"] else None

            got_sse = await eventually(sse_held)
            assert got_sse.values == values_of(truth)
            assert got_sse.frames < writes


async def test_many_subscribers_share_one_snapshot_read(env):
    room = "board:b4"
    async with instances(1, env) as (a,), httpx.AsyncClient(base_url=a.url, timeout=10) as http:
        await http.patch(f"/v1/rooms/{room}/state", json={"set": {"a": 1, "b": 2}}, headers=API)

        async def store_reads() -> float:
            text = (await http.get("/metrics", headers=API)).text
            m = re.search(r'^chat_state_snapshots_total\{source="store"\} (\S+)$', text, re.M)
            return float(m.group(1)) if m else 0.0

        async def memory_reads() -> float:
            text = (await http.get("/metrics", headers=API)).text
            m = re.search(r'^chat_state_snapshots_total\{source="memory"\} (\S+)$', text, re.M)
            return float(m.group(1)) if m else 0.0

        together = asyncio.Barrier(40)

        async def one(i: int, barrier: asyncio.Barrier | None = None) -> dict[str, Any]:
            async with WSClient.connect(f"{a.ws_url}?token={token(f'u{i}')}") as ws:
                if barrier is not None:
                    await barrier.wait()  # connected: all subscribe at once
                await ws.subscribe(room)
                snapshot = await ws.expect("snapshot")
                if barrier is not None:
                    await barrier.wait()  # nobody leaves before all have subscribed
                return snapshot

        snaps = await asyncio.gather(*(one(i, together) for i in range(40)))
        assert all(values_of(s) == {"a": 1, "b": 2} for s in snaps)
        # one store read for the room's opening; the 39 others from its values
        assert await store_reads() == 1
        assert await memory_reads() == 39

        # held: a write keeps the held values current, no read
        async with WSClient.connect(f"{a.ws_url}?token={token('ana')}") as keeper:
            await keeper.subscribe(room)
            await keeper.expect("snapshot")
            before = await store_reads()
            await http.put(f"/v1/rooms/{room}/state/a", json={"value": 5}, headers=API)
            await keeper.expect("state")
            later = await one(99)
            assert values_of(later) == {"a": 5, "b": 2}
            assert await store_reads() == before


async def snapshot_reads(http: httpx.AsyncClient, url: str) -> dict[str, float]:
    """An instance's ``chat_state_snapshots_total`` by source: ``store``, its reads of a
    room's values from the store; ``memory``, answers served without one."""
    text = (await http.get(f"{url}/metrics", headers=API)).text
    return {
        source: sample(text, "chat_state_snapshots_total", source=source)
        for source in ("store", "memory")
    }


async def get_state(http: httpx.AsyncClient, url: str, room: str) -> dict[str, Any]:
    r = await http.get(f"{url}/v1/rooms/{room}/state", headers=API)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    body: dict[str, Any] = r.json()
    assert list(body) == ["room", "seq", "values"] and body["room"] == room
    return body


async def writes_then_gets(
    http: httpx.AsyncClient, writer: str, reader: str, room: str, rounds: int
) -> None:
    """``rounds`` times: a PUT on ``writer``, then at once a GET on ``reader``, which
    holds it; every third round also a DELETE, after which the key is gone."""
    for i in range(rounds):
        r = await http.put(f"{writer}/v1/rooms/{room}/state/n", json={"value": i}, headers=API)
        assert r.status_code == 200, r.text
        seq = r.json()["seq"]
        got = await get_state(http, reader, room)
        assert got["seq"] >= seq and values_of(got)["n"] == i, (i, seq, got)
        assert got["values"]["n"]["seq"] == seq
        if i % 3 == 0:
            r = await http.delete(f"{writer}/v1/rooms/{room}/state/gone", headers=API)
            got = await get_state(http, reader, room)
            assert got["seq"] >= r.json()["seq"] and "gone" not in got["values"], got
            r = await http.put(
                f"{writer}/v1/rooms/{room}/state/gone", json={"value": i}, headers=API
            )
            got = await get_state(http, reader, room)
            assert values_of(got)["gone"] == i


@contextlib.asynccontextmanager
async def polled(http: httpx.AsyncClient, urls: list[str], room: str) -> AsyncIterator[None]:
    """GETs of ``room`` on each of ``urls`` all the while (two at a time each), so
    that reads of the store keep beginning around every write."""
    stop = asyncio.Event()

    async def poll(url: str) -> None:
        while not stop.is_set():
            await get_state(http, url, room)

    tasks = [asyncio.create_task(poll(url)) for url in urls for _ in range(2)]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_concurrent_gets_cost_one_store_read_and_see_every_write_acknowledged(env):
    """``GET …/state`` answers from the values the instance holds for its subscribers,
    or from one store read shared by the GETs of the room and kept while nothing is
    written: fifty at once cost at most one read, none once the room is held; and a
    GET right after a PUT or DELETE on the same instance has it, while other GETs
    keep reads of the store beginning all the time."""
    room = "board:get"
    limits = httpx.Limits(max_connections=100)
    # A kept read lasts 3 x POSITION_INTERVAL at most: long enough here that a slow
    # machine's hundred GETs and scrapes all fall within it.
    async with (
        instances(1, {**env, "POSITION_INTERVAL": "30"}) as (a,),
        httpx.AsyncClient(timeout=10, limits=limits) as http,
    ):
        r = await http.patch(
            f"{a.url}/v1/rooms/{room}/state", json={"set": {"a": 1, "b": [2]}}, headers=API
        )
        assert r.status_code == 200
        before = await snapshot_reads(http, a.url)
        answers = await asyncio.gather(*(get_state(http, a.url, room) for _ in range(50)))
        assert all(x == answers[0] for x in answers)
        assert answers[0]["seq"] == 2 and values_of(answers[0]) == {"a": 1, "b": [2]}
        after = await snapshot_reads(http, a.url)
        assert after["store"] - before["store"] == 1, "no answer held: one read for all"
        assert after["memory"] - before["memory"] == 49
        await asyncio.gather(*(get_state(http, a.url, room) for _ in range(50)))
        assert (await snapshot_reads(http, a.url))["store"] == after["store"], "kept"
        read = (await http.get(f"{a.url}/v1/rooms/{room}/state", headers=API)).content

        async with polled(http, [a.url], room):
            await writes_then_gets(http, a.url, a.url, room, 20)

        async with WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ws:
            await ws.subscribe(room)
            snapshot = await ws.expect("snapshot")
            held = await snapshot_reads(http, a.url)
            answers = await asyncio.gather(*(get_state(http, a.url, room) for _ in range(50)))
            assert all(x == answers[0] for x in answers)
            assert answers[0]["seq"] == snapshot["seq"]
            assert answers[0]["values"] == snapshot["values"]
            assert (await snapshot_reads(http, a.url))["store"] == held["store"], "held values"
            async with polled(http, [a.url], room):
                await writes_then_gets(http, a.url, a.url, room, 20)

        # the same bytes from the held values as from the store
        room = "board:get-bytes"
        await http.patch(
            f"{a.url}/v1/rooms/{room}/state",
            json={"set": {"x": {"deep": [1, "two", None]}, "y": "é", "z": 3.5}, "delete": ["y"]},
            headers=API,
        )
        read = (await http.get(f"{a.url}/v1/rooms/{room}/state", headers=API)).content
        async with WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ws:
            await ws.subscribe(room)
            await ws.expect("snapshot")
            reads = await snapshot_reads(http, a.url)
            memory = (await http.get(f"{a.url}/v1/rooms/{room}/state", headers=API)).content
            assert (await snapshot_reads(http, a.url))["store"] == reads["store"]
        assert memory == read


async def test_a_write_acknowledged_on_one_instance_is_in_a_get_on_the_other_at_once(env):
    """Instance B answers GETs from a kept read, then from the values it holds for a
    subscriber; every GET on B right after a PUT or DELETE acknowledged by A has
    it, whether or not A's publish has reached B yet (B reads the room's seq key
    first, which A raised before its answer)."""
    room = "board:across"
    async with instances(2, env) as (a, b), httpx.AsyncClient(timeout=10) as http:
        await http.put(f"{a.url}/v1/rooms/{room}/state/n", json={"value": -1}, headers=API)
        assert values_of(await get_state(http, b.url, room)) == {"n": -1}
        async with polled(http, [b.url], room):
            await writes_then_gets(http, a.url, b.url, room, 20)
        async with WSClient.connect(f"{b.ws_url}?token={token('bob')}") as ws:
            await ws.subscribe(room)
            await ws.expect("snapshot")
            async with polled(http, [b.url], room):
                await writes_then_gets(http, a.url, b.url, room, 20)
                await writes_then_gets(http, b.url, a.url, room, 10)
            # once delivered, B answers from what it holds, without reading the store
            truth = await get_state(http, a.url, room)
            await held_by(ws, room, lambda h: h.seq >= truth["seq"])
            reads = await snapshot_reads(http, b.url)
            assert await get_state(http, b.url, room) == truth
            assert (await snapshot_reads(http, b.url))["store"] == reads["store"]


async def test_a_get_on_an_instance_the_publish_has_not_reached_reads_the_store(env):
    """Instance A commits and acknowledges writes but never publishes them (as if
    killed after each commit): B, holding the room for a subscriber, learns of them
    only from its position check, up to POSITION_INTERVAL later. Meanwhile a GET on
    B finds the room's seq key ahead of what it holds and answers from the store;
    once the fill has come, from what it holds."""
    room = "board:unpublished"
    async with (
        instances(1, {**env, "FAULT_SKIP_PUBLISH": "1"}) as (a,),
        instances(1, env) as (b,),
        httpx.AsyncClient(timeout=10) as http,
        WSClient.connect(f"{b.ws_url}?token={token('bob')}") as ws,
    ):
        await ws.subscribe(room)
        await ws.expect("snapshot")
        for i in range(5):
            r = await http.put(f"{a.url}/v1/rooms/{room}/state/n", json={"value": i}, headers=API)
            got = await get_state(http, b.url, room)
            assert (got["seq"], values_of(got)) == (r.json()["seq"], {"n": i})
        held = await held_by(ws, room, lambda h: h.seq >= got["seq"])
        assert held.values == {"n": 4}
        reads = await snapshot_reads(http, b.url)
        assert await get_state(http, b.url, room) == got
        assert (await snapshot_reads(http, b.url))["store"] == reads["store"]


async def test_sql_set_state_is_visible_at_commit_only(env, pg_url):
    room = "board:sql"
    async with instances(1, env) as (a,), httpx.AsyncClient(base_url=a.url, timeout=10) as http:
        async with WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ws:
            await ws.subscribe(room)
            await ws.expect("snapshot")
            conn = await asyncpg.connect(pg_url)
            try:
                async with conn.transaction():
                    seq = await conn.fetchval(
                        "SELECT chat_set_state($1, 'temp', '{\"c\": 21}'::jsonb)", room
                    )
                    assert seq == 1
                    # not visible before COMMIT
                    r = await http.get(f"/v1/rooms/{room}/state", headers=API)
                    assert values_of(r.json()) == {}
                frame = await ws.expect("state")
                assert (frame["key"], frame["seq"], frame["value"]) == ("temp", 1, {"c": 21})

                tx = conn.transaction()
                await tx.start()
                await conn.fetchval("SELECT chat_set_state($1, 'temp', '5'::jsonb)", room)
                await conn.fetchval("SELECT chat_delete_state($1, 'other')", room)
                await tx.rollback()
                seq = await conn.fetchval("SELECT chat_delete_state($1, 'temp')", room)
                assert seq == 2, "a rolled-back write took no seq"
                frame = await ws.expect("state")
                assert (frame["key"], frame["seq"], frame.get("deleted")) == ("temp", 2, True)
                assert not [f for f in ws.frames if f.get("value") == 5]

                with pytest.raises(asyncpg.InvalidParameterValueError):
                    await conn.fetchval("SELECT chat_set_state($1, 'k', NULL)", room)
                with pytest.raises(asyncpg.InvalidParameterValueError):
                    await conn.fetchval("SELECT chat_set_state($1, 'bad key', '1')", room)
                r = await http.get(f"/v1/rooms/{room}/state", headers=API)
                assert r.json() == {"room": room, "seq": 2, "values": {}}
            finally:
                await conn.close()


async def test_a_sql_write_reaches_get_once_the_instance_hears_of_it(env, pg_url):
    """A GET's read is kept while nothing is written; a write committed from SQL
    ends it as soon as the instance hears of the commit (its NOTIFY)."""
    room = "board:sql-get"
    async with instances(1, env) as (a,), httpx.AsyncClient(timeout=10) as http:
        await http.put(f"{a.url}/v1/rooms/{room}/state/k", json={"value": 1}, headers=API)
        assert values_of(await get_state(http, a.url, room)) == {"k": 1}
        conn = await asyncpg.connect(pg_url)
        try:
            seq = await conn.fetchval("SELECT chat_set_state($1, 'k', '2'::jsonb)", room)
        finally:
            await conn.close()

        async def written() -> dict[str, Any] | None:
            got = await get_state(http, a.url, room)
            return got if got["seq"] == seq else None

        got = await eventually(written, timeout=5)
        assert values_of(got) == {"k": 2}
        assert values_of(await get_state(http, a.url, room)) == {"k": 2}


async def test_subscribers_converge_after_a_redis_restart_while_writing(env):
    """Writes keep going on instance A while the Redis both instances share is
    killed and started again: publishes are lost meanwhile, and the subscribers
    on both instances end up holding exactly the store's values (their fills on
    reconnect and the position check read the store), never an older value of a
    key after a newer one."""
    rs = RedisServer()
    rs.start()
    env = {**env, "REDIS_URL": rs.url}
    room = "board:redis"
    try:
        async with instances(2, env) as (a, b), httpx.AsyncClient(timeout=30) as http:
            async with (
                WSClient.connect(f"{a.ws_url}?token={token('ana')}") as on_a,
                WSClient.connect(f"{b.ws_url}?token={token('bob')}") as on_b,
            ):
                await on_a.subscribe(room)
                await on_b.subscribe(room, conflate_ms=100)
                done = asyncio.Event()

                async def writer() -> None:
                    i = 0
                    while not done.is_set():
                        body = {"set": {f"k{i % 4}": i, "n": i}}
                        r = await http.patch(
                            f"{a.url}/v1/rooms/{room}/state", json=body, headers=API
                        )
                        assert r.status_code == 200, r.text
                        i += 1
                        await asyncio.sleep(0.01)

                task = asyncio.create_task(writer())
                try:
                    await asyncio.sleep(0.5)
                    rs.stop()
                    await asyncio.sleep(1.0)
                    rs.start()
                    await asyncio.sleep(1.0)
                finally:
                    done.set()
                    await task
                truth = (await http.get(f"{a.url}/v1/rooms/{room}/state", headers=API)).json()
                done_at = lambda h: h.seq >= truth["seq"]  # noqa: E731
                for ws in (on_a, on_b):
                    held = await held_by(ws, room, done_at, timeout=30)
                    assert held.values == values_of(truth)
    finally:
        rs.stop()


async def test_state_rooms_on_the_embedded_defaults(tmp_path):
    """SQLite and the in-process broker: the same routes, snapshot and live writes."""
    path = tmp_path / "namespaces.toml"
    path.write_text(NAMESPACES)
    env = embedded_env(tmp_path, NAMESPACES_FILE=str(path))
    room = "board:embedded"
    async with instances(1, env) as (a,), httpx.AsyncClient(base_url=a.url, timeout=10) as http:
        r = await http.patch(
            f"/v1/rooms/{room}/state", json={"set": {"a": {"x": [1]}}, "delete": ["b"]}
        )
        assert r.status_code == 200, r.text
        assert [w["seq"] for w in r.json()["writes"]] == [1, 2]
        async with WSClient.connect(a.ws_url) as ws:
            await ws.subscribe(room)
            assert values_of(await ws.expect("snapshot")) == {"a": {"x": [1]}}
            await http.put(f"/v1/rooms/{room}/state/b", json={"value": True})
            frame = await ws.expect("state")
            assert (frame["key"], frame["seq"], frame["value"]) == ("b", 3, True)
        async with WSClient.connect(a.ws_url) as ws:
            await ws.subscribe(room, since=1)
            frame = await ws.expect("state")
            assert (frame["key"], frame["seq"]) == ("b", 3), "b's tombstone replaced by its set"
        r = await http.get(f"/v1/rooms/{room}/state")
        assert values_of(r.json()) == {"a": {"x": [1]}, "b": True} and r.json()["seq"] == 3


async def test_gets_on_the_embedded_defaults_share_a_read_and_see_their_writes(tmp_path):
    """SQLite and the in-process broker (one instance, no Redis to hold the room's
    seq key): fifty GETs at once cost one store read, and a GET after each PUT or
    DELETE has it while other GETs keep reads beginning."""
    env = namespaces_env(embedded_env(tmp_path), tmp_path, NAMESPACES, SECRET, KEY)
    room = "board:embedded-get"
    async with (
        instances(1, env) as (a,),
        httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_connections=100)) as http,
    ):
        await http.put(f"{a.url}/v1/rooms/{room}/state/n", json={"value": -1}, headers=API)
        before = await snapshot_reads(http, a.url)
        answers = await asyncio.gather(*(get_state(http, a.url, room) for _ in range(50)))
        assert all(x == answers[0] and values_of(x) == {"n": -1} for x in answers)
        assert (await snapshot_reads(http, a.url))["store"] - before["store"] == 1
        async with polled(http, [a.url], room):
            await writes_then_gets(http, a.url, a.url, room, 15)


async def test_ephemeral_events_conflate_per_event_name(env):
    room = "live:scores"
    async with instances(1, env) as (a,), httpx.AsyncClient(base_url=a.url, timeout=10) as http:
        async with (
            WSClient.connect(f"{a.ws_url}?token={token('ana')}") as conflated,
            WSClient.connect(f"{a.ws_url}?token={token('bob')}") as every,
        ):
            await conflated.subscribe(room, conflate_ms=300)
            await every.subscribe(room)
            for i in range(30):
                body = {"room": room, "event": "tick", "data": {"i": i}}
                assert (await http.post("/v1/publish", json=body, headers=API)).status_code == 202
            body = {"room": room, "event": "goal", "data": {"by": "x"}}
            assert (await http.post("/v1/publish", json=body, headers=API)).status_code == 202

            async def events(ws: WSClient, until: Any) -> list[dict[str, Any]]:
                got = [f for f in ws.frames if f.get("type") == "event"]
                while not until(got):
                    got.append(await ws.expect("event"))
                return got

            all_of = await events(every, lambda g: len(g) == 31)
            assert [f["data"]["i"] for f in all_of if f["event"] == "tick"] == list(range(30))
            some = await events(
                conflated,
                lambda g: (
                    any(f["event"] == "goal" for f in g)
                    and any(f["event"] == "tick" and f["data"]["i"] == 29 for f in g)
                ),
            )
            ticks = [f["data"]["i"] for f in some if f["event"] == "tick"]
            assert ticks == sorted(ticks) and ticks[-1] == 29
            assert len(ticks) < 30


async def test_a_resume_from_before_a_purged_tombstone_gets_a_snapshot(env):
    """Tombstones older than STATE_TOMBSTONE_TTL are purged by the retention rounds;
    a subscriber resuming from a seq below the newest purged one cannot learn of
    every delete, so it gets a snapshot, not state frames."""
    env = {**env, "STATE_TOMBSTONE_TTL": "1", "RETENTION_INTERVAL": "1"}
    room = "board:purge"
    async with instances(1, env) as (a,), httpx.AsyncClient(base_url=a.url, timeout=10) as http:
        await http.patch(f"/v1/rooms/{room}/state", json={"set": {"a": 1, "b": 2}}, headers=API)
        await http.delete(f"/v1/rooms/{room}/state/b", headers=API)  # seq 3, a tombstone

        async def resumed() -> dict[str, Any]:
            async with WSClient.connect(f"{a.ws_url}?token={token('ana')}") as ws:
                await ws.subscribe(room, since=1)
                frame = await ws.recv()
                assert frame["type"] in ("state", "snapshot"), frame
                return frame

        first = await resumed()  # not purged yet: b's tombstone, as a delete
        if first["type"] == "state":
            assert (first["key"], first["deleted"]) == ("b", True)
        got = await eventually(lambda: _snapshot_or_none(resumed()), timeout=20, interval=0.5)
        assert got["seq"] == 3 and values_of(got) == {"a": 1}


async def _snapshot_or_none(frame: Any) -> dict[str, Any] | None:
    got = await frame
    return got if got["type"] == "snapshot" else None


async def test_a_role_with_only_execute_writes_state_and_nothing_else(env, pg_url):
    role = "cg_state_" + os.urandom(4).hex()
    room = "board:granted"
    async with instances(1, env) as (a,), httpx.AsyncClient(base_url=a.url, timeout=10) as http:
        admin = await asyncpg.connect(pg_url)
        try:
            await admin.execute(f"CREATE ROLE {role} LOGIN")
            base, _, db_name = pg_url.rpartition("/")
            as_role = f"postgresql://{role}@{base.rpartition('@')[2]}/{db_name}"
            db = await asyncpg.connect(as_role)
            try:
                # EXECUTE is not PUBLIC's: no call without the grant
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await db.fetchval("SELECT chat_set_state($1, 'k', '1')", room)
                await admin.execute(
                    "GRANT EXECUTE ON FUNCTION chat_set_state(text, text, jsonb), "
                    f"chat_delete_state(text, text) TO {role}"
                )
                assert await db.fetchval("SELECT chat_set_state($1, 'k', '1')", room) == 1
                assert await db.fetchval("SELECT chat_delete_state($1, 'k')", room) == 2
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await db.fetch("SELECT * FROM room_state")
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await db.fetchval("SELECT chat_write_state($1, 'k', '1')", room)
            finally:
                await db.close()
            r = await http.get(f"/v1/rooms/{room}/state", headers=API)
            assert r.json() == {"room": room, "seq": 2, "values": {}}
        finally:
            await admin.execute(f"DROP OWNED BY {role}")
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
            await admin.close()


async def test_writes_take_the_namespaces_post_bucket(env):
    async with instances(1, env) as (a,), httpx.AsyncClient(base_url=a.url, timeout=10) as http:
        for i in range(2):
            r = await http.put("/v1/rooms/tight:t/state/k", json={"value": i}, headers=user("ana"))
            assert r.status_code == 200, r.text
        r = await http.patch("/v1/rooms/tight:t/state", json={"set": {"k": 9}}, headers=user("ana"))
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert int(r.headers["Retry-After"]) >= 1
        r = await http.get("/v1/rooms/tight:t/state", headers=user("ana"))
        assert values_of(r.json()) == {"k": 1}, "the refused write changed nothing"
        # another namespace's bucket is another bucket
        r = await http.put("/v1/rooms/board:t/state/k", json={"value": 1}, headers=user("ana"))
        assert r.status_code == 200, r.text
