"""Chat on top of messages: edits and deletes, typing, read state.

The store's part on Postgres and SQLite alike, then the whole path on three real
gateway processes: every subscriber's view (its messages, with the changes it was
sent applied in order) must equal the store's final state, with contiguous seqs.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from typing import Any, AsyncIterator

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis
import websockets

from storage import MessageNotFound, NotAuthor, Store, create_store
from tests import harness
from tests.harness import SSEClient, WSClient, eventually, instances, post


@pytest.fixture(params=["postgres", "sqlite"])
async def store(request, tmp_path) -> AsyncIterator[Store]:
    url = (await harness.create_database() if request.param == "postgres"
           else f"sqlite:///{tmp_path}/store.db")
    s = create_store(url)
    await s.start()
    try:
        await s.migrate()
        yield s
    finally:
        await s.close()
        if request.param == "postgres":
            await harness.drop_database(url)


async def test_store_edits_and_deletes_number_changes_and_keep_tombstones(store):
    for i in range(3):
        await store.append("r", "ana", f"m{i + 1}")
    assert await store.position("r") == (3, 0)
    change, msg = await store.change("r", 2, "m2 fixed", author="ana")
    assert change is not None and change.change == 1 and change.after_seq == 3
    assert msg.text == "m2 fixed" and msg.version == 2 and msg.edited_ms is not None
    assert msg.to_dict()["version"] == 2 and msg.to_dict()["deleted_at"] is None
    again, same = await store.change("r", 2, "m2 fixed", author="ana")
    assert again is None and same.version == 2, "an edit to the same text changes nothing"
    await store.append("r", "bo", "m4")
    change, tomb = await store.change("r", 1, None, author=None)
    assert change is not None and (change.change, change.after_seq) == (2, 4)
    assert tomb.text == "" and tomb.deleted_ms is not None and tomb.version == 2
    assert (await store.change("r", 1, None, author=None))[0] is None, "a delete repeats"
    with pytest.raises(MessageNotFound):
        await store.change("r", 1, "back", author=None)
    with pytest.raises(NotAuthor):
        await store.change("r", 4, "not mine", author="ana")
    with pytest.raises(MessageNotFound):
        await store.change("r", 9, "nothing there", author=None)
    with pytest.raises(MessageNotFound):
        await store.change("nowhere", 1, None, author=None)
    assert await store.position("r") == (4, 2)
    page = await store.history("r")
    assert [m.seq for m in page.messages] == [1, 2, 3, 4], "seqs stay contiguous"
    assert [m.text for m in page.messages] == ["", "m2 fixed", "m3", "m4"]
    changes = await store.changes("r", after=0)
    assert [(c.change, c.after_seq, c.message.seq, c.kind) for c in changes] == [
        (1, 3, 2, "message_updated"), (2, 4, 1, "message_deleted")]
    assert [c.change for c in await store.changes("r", after=1)] == [2]


async def test_store_read_positions_never_move_back(store):
    for i in range(10):
        await store.append("r", "ana", f"m{i}")
    await store.append("s", "ana", "x")
    assert (await store.read_position("bo", "r")).unread == 10
    marks = [3, 9, 1, 7, 9, 2, 5, 8, 4, 6] * 3
    await asyncio.gather(*(store.mark_read("bo", "r", n) for n in marks))
    pos = await store.read_position("bo", "r")
    assert (pos.seq, pos.unread) == (9, 1)
    assert (await store.mark_read("bo", "r", 2)).seq == 9, "a lower mark is ignored"
    assert (await store.mark_read("bo", "r", 500)).seq == 10, "capped at the last seq"
    assert (await store.mark_read("bo", "empty", 3)).seq == 0
    await store.mark_read("bo", "s", 0)
    listed = await store.read_positions("bo")
    assert [(p.room, p.seq, p.unread) for p in listed] == [("r", 10, 0), ("s", 0, 1)]
    assert await store.read_positions("nobody") == []


# -- the whole path on real gateways ------------------------------------------------


def view_of(events: list[tuple[str, dict[str, Any]]]) -> tuple[dict[int, dict[str, Any]],
                                                                 list[int], list[int]]:
    """A subscriber's view: its messages with the changes it was sent applied in
    order, the seqs of its message frames and the numbers of its change frames.
    A change must never come before the message it changes."""
    view: dict[int, dict[str, Any]] = {}
    seqs: list[int] = []
    changes: list[int] = []
    for kind, body in events:
        if kind == "message":
            seqs.append(body["seq"])
            view[body["seq"]] = body
        elif kind in ("message_updated", "message_deleted"):
            msg = body["message"]
            assert msg["seq"] in view, f"change {body['change']} came before message {msg['seq']}"
            assert (kind == "message_deleted") == (msg.get("deleted_at") is not None)
            changes.append(body["change"])
            view[msg["seq"]] = msg
    return view, seqs, changes


def ws_events(frames: list[dict[str, Any]], room: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for f in frames:
        if f.get("room") != room:
            continue
        if f.get("type") == "message":
            out.append(("message", f["message"]))
        elif f.get("type") in ("message_updated", "message_deleted"):
            out.append((f["type"], f))
    return out


def sse_events(events: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(e["event"], e["json"]) for e in events
            if e.get("event") in ("message", "message_updated", "message_deleted")]


async def reading(client: WSClient) -> None:
    """Keep receiving frames into ``client.frames`` until cancelled or closed."""
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            client.frames.append(orjson.loads(await client.conn.recv()))


async def subscribe(client: WSClient, room: str, **fields: Any) -> dict[str, Any]:
    await client.send({"type": "subscribe", "room": room, **fields})
    return await client.expect("subscribed")


async def test_edits_and_deletes_racing_posts_reach_every_subscriber_once_in_order(
        gateway_env, pg_url, redis_prefix):
    room = "chat.race"
    posts = 60
    texts: dict[int, list[str]] = {}  # every text each seq ever had
    async with instances(3, gateway_env) as gws, httpx.AsyncClient(timeout=30) as http:
        async with (WSClient.connect(gws[0].ws_url) as ws0,
                    WSClient.connect(gws[2].ws_url) as ws2,
                    SSEClient.open(f"{gws[1].url}/v1/rooms/{room}/events?changes_since=0")
                    as sse1):
            assert (await subscribe(ws0, room, changes_since=0))["change"] == 0
            await subscribe(ws2, room)  # live changes only: the room is empty anyway
            readers = [asyncio.create_task(reading(c)) for c in (ws0, ws2)]
            acked: list[int] = []
            half = asyncio.Event()

            async def writer() -> None:
                for i in range(posts):
                    text = f"post {i} secret-{i}"
                    r = await post(http, gws[i % 3].url, room, text, author=f"u{i % 3}")
                    assert r.status_code == 201, r.text
                    texts[r.json()["seq"]] = [text]
                    acked.append(r.json()["seq"])
                    if len(acked) == posts // 2:
                        half.set()

            async def editor(n: int) -> None:
                rnd = random.Random(n)
                for j in range(20):
                    while len(acked) < 3 * (j + 1):  # spread over the whole run of posts
                        await asyncio.sleep(0.01)
                    seq = rnd.choice(acked[-10:])
                    author = f"u{(seq - 1) % 3}"
                    base = f"{gws[rnd.randrange(3)].url}/v1/rooms/{room}/messages/{seq}"
                    if rnd.random() < 0.25:
                        r = await http.request("DELETE", base, json={"author": author})
                    else:
                        text = f"edit {n}.{j} secret-{seq}-{n}-{j}"
                        r = await http.patch(base, json={"text": text, "author": author})
                        if r.status_code == 200:
                            texts[seq].append(text)
                    assert r.status_code in (200, 404), r.text  # 404: an edit of a deleted one

            resumed: list[dict[str, Any]] = []

            async def resumer() -> None:
                # Holds the room from the start, drops off halfway, resumes elsewhere.
                async with WSClient.connect(gws[1].ws_url) as first:
                    await subscribe(first, room, changes_since=0)
                    task = asyncio.create_task(reading(first))
                    await half.wait()
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                resumed.extend(first.frames)
                await asyncio.sleep(1)  # posts, edits and deletes go on meanwhile
                _, seqs, changes = view_of(ws_events(first.frames, room))
                since = seqs[-1] if seqs else 0
                async with WSClient.connect(gws[2].ws_url) as second:
                    await subscribe(second, room, since=since,
                                    changes_since=changes[-1] if changes else 0)
                    task = asyncio.create_task(reading(second))
                    await done.wait()
                    await eventually(lambda: final_view(resumed + second.frames), timeout=30)
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                resumed.extend(second.frames)

            done = asyncio.Event()
            final: dict[int, dict[str, Any]] = {}

            def final_view(frames: list[dict[str, Any]]) -> bool:
                return done.is_set() and view_of(ws_events(frames, room))[0] == final

            resume_task = asyncio.create_task(resumer())
            await asyncio.gather(writer(), *(editor(n) for n in range(3)))
            page = (await http.get(f"{gws[0].url}/v1/rooms/{room}/messages",
                                   params={"limit": 200})).json()
            final.update({m["seq"]: m for m in page["messages"]})
            done.set()
            assert sorted(final) == list(range(1, posts + 1)), "seqs stay contiguous"
            deleted = [s for s, m in final.items() if m.get("deleted_at")]
            edited = [s for s, m in final.items() if m.get("edited_at") and not m.get("deleted_at")]
            assert deleted and edited, "the race edited and deleted something"
            for seq in deleted:
                assert final[seq]["text"] == "" and final[seq]["version"] >= 2
            # The same state from every instance right after the writes.
            for gw in gws[1:]:
                other = (await http.get(f"{gw.url}/v1/rooms/{room}/messages",
                                        params={"limit": 200})).json()["messages"]
                assert other == page["messages"]

            await eventually(lambda: view_of(ws_events(ws0.frames, room))[0] == final, 30)
            await eventually(lambda: view_of(sse_events(sse1.events))[0] == final, 30)
            await eventually(lambda: view_of(ws_events(ws2.frames, room))[0] == final, 30)
            await asyncio.wait_for(resume_task, harness.t(60))
            await asyncio.sleep(0.5)  # nothing more may come
            for name, events in (("ws0", ws_events(ws0.frames, room)),
                                 ("sse1", sse_events(sse1.events)),
                                 ("ws2", ws_events(ws2.frames, room)),
                                 ("resumed", ws_events(resumed, room))):
                view, seqs, changes = view_of(events)
                assert view == final, name
                assert seqs == list(range(1, posts + 1)), f"{name}: {seqs}"
                assert changes == sorted(set(changes)), f"{name}: a change twice or out of order"
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            # The resumed subscriber got the changes it missed, not only messages.
            _, _, resumed_changes = view_of(ws_events(resumed, room))
            _, _, all_changes = view_of(ws_events(ws0.frames, room))
            assert all_changes == list(range(1, len(all_changes) + 1))
            assert set(resumed_changes) <= set(all_changes)

    gone = [text for seq in deleted for text in texts[seq]]
    conn = await asyncpg.connect(pg_url)
    try:
        assert await conn.fetchval("SELECT count(*) FROM messages WHERE text = ANY($1)",
                                   gone) == 0, "deleted text is still in the store"
        assert await conn.fetchval("SELECT count(*) FROM messages WHERE room = $1 AND "
                                   "deleted_at IS NOT NULL", room) == len(deleted)
    finally:
        await conn.close()
    client = aioredis.from_url(harness.REDIS_URL)
    try:
        cached = b""
        async for key in client.scan_iter(match=f"{redis_prefix}*"):
            kind = await client.type(key)
            if kind == b"string":
                cached += await client.get(key) or b""
            elif kind == b"hash":
                cached += b"".join((await client.hgetall(key)).values())
        assert b"post " in cached, "the reads above cached the room's window"
        assert not [text for text in gone if text.encode() in cached], \
            "deleted text is still in the history cache"
    finally:
        await client.aclose()
