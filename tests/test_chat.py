"""Chat on top of messages: edits and deletes, typing, read state.

The store's part on Postgres and SQLite alike, then the whole path on three real
gateway processes: every subscriber's view (its messages, with the changes it was
sent applied in order) must equal the store's final state, with contiguous seqs.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import asyncpg
import httpx
import jwt
import orjson
import pytest
import redis.asyncio as aioredis
import websockets

from chat_gateway.redisio.context import RedisContext
from chat_gateway.storage import HistoryCache, MessageNotFound, NotAuthor, create_store
from tests import harness
from tests.harness import SSEClient, WSClient, eventually, instances, post


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
        (1, 3, 2, "message_updated"),
        (2, 4, 1, "message_deleted"),
    ]
    assert [c.change for c in await store.changes("r", after=1)] == [2]


async def test_store_idempotency_keys_of_changes_are_scoped_to_room_and_owner(store):
    await store.append("r", "ana", "one")
    await store.append("r", "ana", "two")
    change, msg = await store.change("r", 1, "uno", author="ana", idempotency_key=("ana", "k"))
    assert change is not None and msg.version == 2
    await store.change("r", 1, "eins", author="ana")
    again, now = await store.change("r", 1, "uno", author="ana", idempotency_key=("ana", "k"))
    assert again is None and (now.text, now.version) == ("eins", 3), "a repeat changes nothing"
    repeat, _ = await store.change("r", 2, None, author="ana", idempotency_key=("ana", "k"))
    assert repeat is None, "the key is spent in this room, whatever the request"
    other, _ = await store.change("r", 2, "dos", author="ana", idempotency_key=("bo", "k"))
    assert other is not None, "another owner's key is another key"
    racing = await asyncio.gather(
        *(
            store.change("r", 2, f"x{i}", author=None, idempotency_key=("cy", "race"))
            for i in range(5)
        )
    )
    assert sum(c is not None for c, _ in racing) == 1
    assert await store.position("r") == (2, 4)


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


async def test_a_change_voids_every_instances_window_and_keeps_the_seq_key(pg_url, redis_prefix):
    store = create_store(pg_url)
    await store.start()
    await store.migrate()
    client = aioredis.from_url(harness.REDIS_URL)
    a = HistoryCache(store, RedisContext.of(client), prefix=redis_prefix)
    b = HistoryCache(store, RedisContext.of(client), prefix=redis_prefix)
    try:
        for i in range(3):
            msg, _ = await store.append("r", "ana", f"secret {i}")
            await a.committed(msg)
        for cache in (a, b, a, b):  # both hold the decoded window now
            assert [m.text for m in (await cache.history("r")).messages][0] == "secret 0"
        await store.change("r", 1, None, author=None)
        await a.changed("r")  # b is never told: it must still not serve its window
        page = await b.history("r")
        assert [(m.text, m.version) for m in page.messages] == [
            ("", 2),
            ("secret 1", 1),
            ("secret 2", 1),
        ]
        assert await client.get(f"{redis_prefix}{{r}}:seq") == b"3", "position checks read it"
        raw = await client.hget(f"{redis_prefix}{{r}}:page", "d")
        assert raw is not None and b"secret 0" not in raw
        await store.change("r", 2, "edited", author=None)
        await b.changed("r")
        assert [m.text for m in (await a.history("r")).messages] == ["", "edited", "secret 2"]
    finally:
        await client.aclose()
        await store.close()


# -- the whole path on real gateways ------------------------------------------------


def view_of(
    events: list[tuple[str, dict[str, Any]]],
) -> tuple[dict[int, dict[str, Any]], list[int], list[int]]:
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
    return [
        (e["event"], e["json"])
        for e in events
        if e.get("event") in ("message", "message_updated", "message_deleted")
    ]


async def reading(client: WSClient) -> None:
    """Keep receiving frames into ``client.frames`` until cancelled or closed."""
    with contextlib.suppress(websockets.ConnectionClosed):
        while True:
            client.frames.append(orjson.loads(await client.conn.recv()))


async def subscribe(client: WSClient, room: str, **fields: Any) -> dict[str, Any]:
    await client.send({"type": "subscribe", "room": room, **fields})
    return await client.expect("subscribed")


async def test_edits_and_deletes_racing_posts_reach_every_subscriber_once_in_order(
    gateway_env, pg_url, redis_prefix
):
    room = "chat.race"
    posts = 60
    texts: dict[int, list[str]] = {}  # every text each seq ever had
    async with instances(3, gateway_env) as gws, httpx.AsyncClient(timeout=30) as http:
        async with (
            WSClient.connect(gws[0].ws_url) as ws0,
            WSClient.connect(gws[2].ws_url) as ws2,
            SSEClient.open(f"{gws[1].url}/v1/rooms/{room}/events?changes_since=0") as sse1,
        ):
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
                    await subscribe(
                        second, room, since=since, changes_since=changes[-1] if changes else 0
                    )
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
            page = (
                await http.get(f"{gws[0].url}/v1/rooms/{room}/messages", params={"limit": 200})
            ).json()
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
                other = (
                    await http.get(f"{gw.url}/v1/rooms/{room}/messages", params={"limit": 200})
                ).json()["messages"]
                assert other == page["messages"]

            await eventually(lambda: view_of(ws_events(ws0.frames, room))[0] == final, 30)
            await eventually(lambda: view_of(sse_events(sse1.events))[0] == final, 30)
            await eventually(lambda: view_of(ws_events(ws2.frames, room))[0] == final, 30)
            await asyncio.wait_for(resume_task, harness.t(60))
            await asyncio.sleep(0.5)  # nothing more may come
            for name, events in (
                ("ws0", ws_events(ws0.frames, room)),
                ("sse1", sse_events(sse1.events)),
                ("ws2", ws_events(ws2.frames, room)),
                ("resumed", ws_events(resumed, room)),
            ):
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
        assert (
            await conn.fetchval("SELECT count(*) FROM messages WHERE text = ANY($1)", gone) == 0
        ), "deleted text is still in the store"
        assert await conn.fetchval(
            "SELECT count(*) FROM messages WHERE room = $1 AND deleted_at IS NOT NULL", room
        ) == len(deleted)
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
        assert not [text for text in gone if text.encode() in cached], (
            "deleted text is still in the history cache"
        )
    finally:
        await client.aclose()


async def test_typing_reaches_the_others_on_every_instance_at_most_every_two_seconds(gateway_env):
    room = "chat.typing"
    # A bucket of two posts: typing must not take from it.
    env = {**gateway_env, "RATE_LIMIT": "2/60s"}
    async with instances(3, env) as gws, httpx.AsyncClient(timeout=10) as http:
        async with (
            WSClient.connect(gws[0].ws_url + "?user=ana") as ana,
            WSClient.connect(gws[0].ws_url + "?user=ana") as ana2,
            WSClient.connect(gws[1].ws_url + "?user=bo") as bo,
            WSClient.connect(gws[2].ws_url) as nameless,
            SSEClient.open(f"{gws[2].url}/v1/rooms/{room}/events?user=cy") as cy,
        ):
            for c in (ana, ana2, bo, nameless):
                await subscribe(c, room)
            readers = [asyncio.create_task(reading(c)) for c in (ana2, bo)]
            await ana.send({"type": "typing", "room": "elsewhere"})
            refused = await ana.expect("error")
            assert refused["code"] == "invalid_request"
            await nameless.send({"type": "typing", "room": room})
            assert (await nameless.expect("error"))["field"] == "user"

            def typing(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
                return [f for f in frames if f.get("type") == "typing"]

            for _ in range(10):
                await ana.send({"type": "typing", "room": room})
            await ana.send({"type": "ping", "ref": "p"})
            await ana.expect("pong")
            await eventually(
                lambda: typing(bo.frames) and [e for e in cy.events if e.get("event") == "typing"]
            )
            await asyncio.sleep(0.5)  # the other nine were dropped, not late
            assert typing(bo.frames) == [{"type": "typing", "room": room, "user": "ana"}]
            assert [e["json"] for e in cy.events if e.get("event") == "typing"] == [
                {"type": "typing", "room": room, "user": "ana"}
            ]
            assert typing(ana.frames) == typing(ana2.frames) == [], "not echoed to the typist"
            await asyncio.sleep(2.1)
            await bo.send({"type": "typing", "room": room})
            await ana.send({"type": "typing", "room": room})
            await eventually(lambda: len(typing(bo.frames)) == 2)
            await eventually(lambda: [f["user"] for f in typing(ana2.frames)] == ["bo"])
            # Eleven typing frames and the post bucket is still full.
            for i in range(2):
                r = await post(http, gws[0].url, room, f"m{i}", author="ana")
                assert r.status_code == 201, r.text
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


async def test_read_positions_never_move_back_and_receipts_go_out(gateway_env):
    room = "chat.read"
    async with instances(3, gateway_env) as gws, httpx.AsyncClient(timeout=10) as http:
        for i in range(30):
            assert (await post(http, gws[0].url, room, f"m{i}")).status_code == 201
        assert (await post(http, gws[0].url, "chat.other", "x")).status_code == 201
        async with WSClient.connect(gws[2].ws_url + "?user=watcher") as watcher:
            await subscribe(watcher, room)
            reader_task = asyncio.create_task(reading(watcher))
            rnd = random.Random(7)
            marks = [rnd.randrange(0, 31) for _ in range(60)]
            seen: list[int] = []

            async def mark(i: int, seq: int) -> None:
                r = await http.post(
                    f"{gws[i % 3].url}/v1/rooms/{room}/read", json={"seq": seq, "user": "bo"}
                )
                assert r.status_code == 200, r.text
                seen.append(r.json()["seq"])

            async def watch() -> None:
                last = 0
                for _ in range(20):
                    r = await http.get(f"{gws[1].url}/v1/rooms/{room}/read", params={"user": "bo"})
                    assert r.json()["seq"] >= last, "a read position moved back"
                    last = r.json()["seq"]

            await asyncio.gather(watch(), *(mark(i, s) for i, s in enumerate(marks)))
            top = max(marks)
            r = await http.get(f"{gws[0].url}/v1/rooms/{room}/read", params={"user": "bo"})
            assert r.json() == {"room": room, "seq": top, "unread": 30 - top}
            assert max(seen) == top
            # Every answer is at least the mark it answered (GREATEST, never lower).
            r = await http.post(f"{gws[1].url}/v1/rooms/{room}/read", json={"seq": 1, "user": "bo"})
            assert r.json()["seq"] == top
            # A WS read frame (open mode: the connection's ?user=) and the list in one call.
            async with WSClient.connect(gws[1].ws_url + "?user=bo") as bo:
                await bo.send({"type": "read", "room": "chat.other", "seq": 1, "ref": 9})
                ack = await bo.expect("ack")
                assert ack == {
                    "type": "ack",
                    "ref": 9,
                    "read": {"room": "chat.other", "seq": 1, "unread": 0},
                }
            r = await http.get(f"{gws[2].url}/v1/read", params={"user": "bo"})
            assert r.json() == {
                "rooms": [
                    {"room": "chat.other", "seq": 1, "unread": 0},
                    {"room": room, "seq": top, "unread": 30 - top},
                ]
            }
            # Read receipts reach the room's subscribers, debounced to a few.
            await eventually(
                lambda: [f for f in watcher.frames if f.get("type") == "read" and f["seq"] == top]
            )
            receipts = [f for f in watcher.frames if f.get("type") == "read"]
            assert all(f["user"] == "bo" and f["room"] == room for f in receipts)
            assert len(receipts) <= 6, f"not debounced: {len(receipts)} receipts for 61 marks"
            reader_task.cancel()
            await asyncio.gather(reader_task, return_exceptions=True)
        # Bad input changes nothing.
        for body in (
            {"seq": -1, "user": "bo"},
            {"seq": "x", "user": "bo"},
            {"user": "bo"},
            {"seq": 3},
            {"seq": 3, "user": "bo", "extra": 1},
        ):
            r = await http.post(f"{gws[0].url}/v1/rooms/{room}/read", json=body)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", body
        r = await http.get(f"{gws[0].url}/v1/rooms/{room}/read", params={"user": "bo"})
        assert r.json()["seq"] == top


SECRET = "chat-test-secret-" + "0123456789abcdef" * 4


def token(sub: str, **claims: Any) -> dict[str, str]:
    tok = jwt.encode(
        {"sub": sub, "exp": int(time.time()) + 600, **claims}, SECRET, algorithm="HS256"
    )
    return {"Authorization": f"Bearer {tok}"}


async def test_only_the_author_or_an_api_key_changes_a_message(gateway_env):
    room = "chat.auth"
    env = {**gateway_env, "AUTH_SECRET": SECRET, "API_KEYS": "key-one"}
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        url = f"{gw.url}/v1/rooms/{room}/messages"
        for text in ("one", "two", "three"):
            r = await http.post(url, json={"text": text}, headers=token("ana"))
            assert r.status_code == 201
        r = await http.patch(f"{url}/1", json={"text": "bo was here"}, headers=token("bo"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = await http.request("DELETE", f"{url}/1", headers=token("bo"))
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        r = await http.patch(f"{url}/1", json={"text": "one"})
        assert r.status_code == 401
        r = await http.patch(f"{url}/1", json={"text": "uno"}, headers=token("ana"))
        assert r.status_code == 200 and r.json()["text"] == "uno" and r.json()["version"] == 2
        assert "RateLimit-Remaining" in r.headers, "rate-limited with posts"
        r = await http.patch(
            f"{url}/2", json={"text": "moderated"}, headers={"Authorization": "Bearer key-one"}
        )
        assert r.status_code == 200 and r.json()["author"] == "ana"
        r = await http.request("DELETE", f"{url}/3", headers={"Authorization": "Bearer key-one"})
        assert r.status_code == 200 and r.json()["text"] == "" and r.json()["deleted_at"]
        r = await http.request("DELETE", f"{url}/3", headers={"Authorization": "Bearer key-one"})
        assert r.status_code == 200 and r.json()["version"] == 2, "a repeated delete is a no-op"
        # Bad input: 422 (or 404 for no such message), and nothing changes.
        bad = [
            ("PATCH", "1", {"text": ""}),
            ("PATCH", "1", {"text": 5}),
            ("PATCH", "1", {"text": "x", "extra": True}),
            ("PATCH", "0", {"text": "x"}),
            ("PATCH", "abc", {"text": "x"}),
            ("PATCH", "1", {}),
            ("DELETE", "-1", None),
            ("PATCH", "99", {"text": "x"}),
            ("DELETE", "99", None),
            ("PATCH", "3", {"text": "back from the dead"}),
        ]
        for method, seq, body in bad:
            r = await http.request(method, f"{url}/{seq}", json=body, headers=token("ana"))
            expected = 404 if seq in ("99", "3") else 422
            assert r.status_code == expected, (method, seq, body, r.text)
            assert r.json()["error"]["code"] == (
                "not_found" if expected == 404 else "invalid_request"
            )
        r = await http.patch(
            f"{gw.url}/v1/rooms/bad%20room/messages/1", json={"text": "x"}, headers=token("ana")
        )
        assert r.status_code == 422
        page = (await http.get(url, headers=token("ana"))).json()["messages"]
        assert [(m["text"], m.get("version", 1)) for m in page] == [
            ("uno", 2),
            ("moderated", 2),
            ("", 2),
        ]
        # Over WS: the token's sub decides, answered like a publish.
        async with (
            WSClient.connect(gw.ws_url + "?token=" + token("bo")["Authorization"][7:]) as bo,
            WSClient.connect(gw.ws_url + "?token=" + token("ana")["Authorization"][7:]) as ana,
        ):
            await subscribe(bo, room)
            await bo.send({"type": "edit", "room": room, "seq": 1, "text": "mine", "ref": "e1"})
            err = await bo.expect("error")
            assert (err["ref"], err["code"]) == ("e1", "forbidden")
            await ana.send({"type": "edit", "room": room, "seq": 1, "text": "ana's", "ref": 1})
            ack = await ana.expect("ack")
            assert ack["ref"] == 1 and ack["message"]["version"] == 3
            await ana.send({"type": "delete", "room": room, "seq": 1, "ref": 2})
            ack = await ana.expect("ack")
            assert ack["ref"] == 2 and ack["message"]["deleted_at"]
            updated = await bo.expect("message_updated")
            assert updated["message"]["text"] == "ana's" and updated["change"] == 4
            assert (await bo.expect("message_deleted"))["change"] == 5


async def test_a_moderator_claim_edits_and_deletes_anyones_message_in_its_rooms(gateway_env):
    room = "mod.lobby"
    env = {**gateway_env, "AUTH_SECRET": SECRET}
    mod = token("mia", moderate=["mod.*"])
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        url = f"{gw.url}/v1/rooms/{room}/messages"
        for text in ("one", "two", "three", "four"):
            r = await http.post(url, json={"text": text}, headers=token("ana"))
            assert r.status_code == 201
        other = f"{gw.url}/v1/rooms/elsewhere/messages"
        assert (
            await http.post(other, json={"text": "hi"}, headers=token("ana"))
        ).status_code == 201
        async with WSClient.connect(
            gw.ws_url + "?token=" + token("ana")["Authorization"][7:]
        ) as ana:
            await subscribe(ana, room)
            r = await http.patch(f"{url}/1", json={"text": "moderated"}, headers=mod)
            assert r.status_code == 200, r.text
            assert (r.json()["author"], r.json()["text"]) == ("ana", "moderated")
            r = await http.request("DELETE", f"{url}/2", headers=mod)
            assert r.status_code == 200 and r.json()["deleted_at"], r.text
            updated = await ana.expect("message_updated")
            assert updated["message"]["seq"] == 1 and updated["message"]["text"] == "moderated"
            deleted = await ana.expect("message_deleted")
            assert deleted["message"]["seq"] == 2
            # Over WS too.
            async with WSClient.connect(gw.ws_url + "?token=" + mod["Authorization"][7:]) as ws:
                await ws.send(
                    {"type": "edit", "room": room, "seq": 3, "text": "tidied", "ref": "m1"}
                )
                ack = await ws.expect("ack")
                assert ack["ref"] == "m1" and ack["message"]["text"] == "tidied"
                await ws.send({"type": "delete", "room": room, "seq": 4, "ref": "m2"})
                ack = await ws.expect("ack")
                assert ack["ref"] == "m2" and ack["message"]["deleted_at"]
                await ws.send({"type": "delete", "room": "elsewhere", "seq": 1, "ref": "m3"})
                err = await ws.expect("error")
                assert (err["ref"], err["code"]) == ("m3", "forbidden")
            assert (await ana.expect("message_updated"))["message"]["text"] == "tidied"
            assert (await ana.expect("message_deleted"))["message"]["seq"] == 4
        # Outside the claim's rooms, or without the claim, or without read access: 403.
        refused = [
            (mod, other),
            (token("bo"), url),
            (token("bo", moderate=[]), url),
            (token("mia", moderate=["mod.*"], rooms=["other.*"]), url),
        ]
        for headers, target in refused:
            r = await http.patch(f"{target}/1", json={"text": "x"}, headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
            r = await http.request("DELETE", f"{target}/1", headers=headers)
            assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
        r = await http.patch(f"{url}/1", json={"text": "x"}, headers=token("mia", moderate="mod.*"))
        assert r.status_code == 401, "the claim is a list of strings"
        page = (await http.get(url, headers=token("ana"))).json()["messages"]
        assert [m["text"] for m in page] == ["moderated", "", "tidied", ""]
        assert (await http.get(other, headers=token("ana"))).json()["messages"][0]["text"] == "hi"


async def test_a_read_only_grant_neither_changes_messages_nor_types(gateway_env):
    """``read_rooms`` grants reading: a PATCH or DELETE of the holder's own message,
    a WS edit, delete or typing frame is refused like a post (403 / error frame
    ``forbidden``, "read-only"), nothing changes and nobody is told; marking read
    stays allowed."""
    room = "ro.lobby"
    env = {**gateway_env, "AUTH_SECRET": SECRET}
    writer = token("ana")
    reader = token("ana", read_rooms=[room])  # the same sub, once it may only read
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        url = f"{gw.url}/v1/rooms/{room}/messages"
        for text in ("one", "two"):
            assert (await http.post(url, json={"text": text}, headers=writer)).status_code == 201

        def read_only(r: httpx.Response) -> None:
            assert r.status_code == 403, r.text
            error = r.json()["error"]
            assert error["code"] == "forbidden" and "read-only" in error["message"], error

        read_only(await http.post(url, json={"text": "three"}, headers=reader))
        read_only(await http.patch(f"{url}/1", json={"text": "changed"}, headers=reader))
        read_only(await http.request("DELETE", f"{url}/2", headers=reader))
        r = await http.post(f"{gw.url}/v1/rooms/{room}/read", json={"seq": 2}, headers=reader)
        assert r.status_code == 200 and r.json()["seq"] == 2, r.text

        async with (
            WSClient.connect(gw.ws_url + "?token=" + reader["Authorization"][7:]) as ro,
            WSClient.connect(gw.ws_url + "?token=" + token("bo")["Authorization"][7:]) as bo,
        ):
            await subscribe(ro, room)
            await subscribe(bo, room)
            frames = [
                {"type": "edit", "room": room, "seq": 1, "text": "changed", "ref": "e"},
                {"type": "delete", "room": room, "seq": 2, "ref": "d"},
                {"type": "typing", "room": room},
            ]
            for frame in frames:
                await ro.send(frame)
                err = await ro.expect("error")
                assert (err.get("ref"), err["code"]) == (frame.get("ref"), "forbidden"), err
                assert "read-only" in err["message"]
            await ro.send({"type": "read", "room": room, "seq": 1, "ref": "r"})
            assert (await ro.expect("ack"))["ref"] == "r"
            # bo's own typing and a post are the markers: nothing of ro came before them.
            await bo.send({"type": "typing", "room": room})
            assert (await http.post(url, json={"text": "three"}, headers=writer)).status_code == 201
            await bo.expect("message")
            await asyncio.sleep(0.3)
            kinds = [f.get("type") for f in bo.frames]
            assert "typing" not in kinds and "message_updated" not in kinds, bo.frames
            assert "message_deleted" not in kinds, bo.frames
        page = (await http.get(url, headers=reader)).json()["messages"]
        assert [(m["text"], m.get("version", 1)) for m in page] == [
            ("one", 1),
            ("two", 1),
            ("three", 1),
        ]


async def test_changes_whose_publish_was_lost_are_filled_from_the_store(gateway_env):
    """Instance A commits changes but never publishes them (as if killed after each
    commit); changes alternate between A and B, so B's and C's subscribers see a gap in
    change numbers (gap fill) and a silent tail (the change position check)."""
    room = "chat.lost"
    env_a = {**gateway_env, "FAULT_SKIP_PUBLISH": "1"}
    async with (
        instances(1, env_a) as (a,),
        instances(2, gateway_env) as (b, c),
        httpx.AsyncClient(timeout=10) as http,
    ):
        for i in range(5):
            assert (await post(http, b.url, room, f"m{i}", author="ana")).status_code == 201
        async with (
            WSClient.connect(b.ws_url) as ws,
            SSEClient.open(f"{c.url}/v1/rooms/{room}/events?since=0") as sse,
        ):
            await subscribe(ws, room, since=0)
            task = asyncio.create_task(reading(ws))
            for i in range(12):
                target = a if i % 2 == 0 or i >= 9 else b
                seq = i % 5 + 1
                url = f"{target.url}/v1/rooms/{room}/messages/{seq}"
                r = await http.patch(url, json={"text": f"edit {i}", "author": "ana"})
                assert r.status_code == 200, r.text
            final = {
                m["seq"]: m
                for m in (await http.get(f"{b.url}/v1/rooms/{room}/messages")).json()["messages"]
            }
            await eventually(lambda: len(view_of(ws_events(ws.frames, room))[2]) == 12, 20)
            await eventually(lambda: len(view_of(sse_events(sse.events))[2]) == 12, 20)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            for events in (ws_events(ws.frames, room), sse_events(sse.events)):
                view, seqs, changes = view_of(events)
                assert changes == list(range(1, 13))
                assert view == final and seqs == [1, 2, 3, 4, 5]
            # A never published: what B delivered of it came from the store.
            fills = sum(
                [
                    await harness.metric(b.url, "chat_gap_fills_total", reason=reason)
                    for reason in ("change", "change_position")
                ]
            )
            assert fills >= 1


async def _posts_and_edits(
    http: httpx.AsyncClient, gws: list[harness.Instance], room: str, start: int, count: int
) -> None:
    """``count`` posts over the instances in turn, each followed by an edit of the
    message before it and, every third, a delete of the one before that."""
    for i in range(start, start + count):
        gw = gws[i % len(gws)]
        r = await post(http, gw.url, room, f"m{i}", author="ana")
        assert r.status_code == 201, r.text
        seq = r.json()["seq"]
        if seq > 1:
            r = await http.patch(
                f"{gw.url}/v1/rooms/{room}/messages/{seq - 1}",
                json={"text": f"m{i - 1} edited", "author": "ana"},
            )
            assert r.status_code in (200, 404), r.text
        if seq > 2 and i % 3 == 0:
            r = await http.request(
                "DELETE", f"{gw.url}/v1/rooms/{room}/messages/{seq - 2}", json={"author": "ana"}
            )
            assert r.status_code == 200, r.text
        await asyncio.sleep(0.01)


async def test_changes_survive_a_redis_restart_and_an_instance_kill(gateway_env):
    rs = harness.RedisServer()
    rs.start()
    env = {**gateway_env, "REDIS_URL": rs.url, "BROKER_PROBE_INTERVAL": "0.5"}
    room = "chat.outage"
    try:
        async with instances(3, env) as gws, httpx.AsyncClient(timeout=30) as http:
            async with contextlib.AsyncExitStack() as stack:
                wss = [await stack.enter_async_context(WSClient.connect(g.ws_url)) for g in gws[:2]]
                sses = [
                    await stack.enter_async_context(
                        SSEClient.open(f"{g.url}/v1/rooms/{room}/events?changes_since=0")
                    )
                    for g in gws[:2]
                ]
                for ws in wss:
                    await subscribe(ws, room, changes_since=0)
                readers = [asyncio.create_task(reading(ws)) for ws in wss]
                victim_frames: list[dict[str, Any]] = []
                async with WSClient.connect(gws[2].ws_url) as victim:
                    await subscribe(victim, room, changes_since=0)
                    victim_reader = asyncio.create_task(reading(victim))
                    await _posts_and_edits(http, gws, room, 0, 12)
                    rs.stop()
                    await _posts_and_edits(http, gws, room, 12, 12)  # committed meanwhile
                    rs.start()
                    await eventually(lambda: all_ready(http, gws), timeout=15)
                    await _posts_and_edits(http, gws, room, 24, 6)
                    gws[2].kill()
                    await asyncio.wait_for(victim_reader, harness.t(10))
                    victim_frames = list(victim.frames)
                # The victim resumes on another instance from what it had.
                _, seqs, changes = view_of(ws_events(victim_frames, room))
                async with WSClient.connect(gws[1].ws_url) as resumed:
                    await subscribe(
                        resumed,
                        room,
                        since=seqs[-1] if seqs else 0,
                        changes_since=changes[-1] if changes else 0,
                    )
                    resumed_reader = asyncio.create_task(reading(resumed))
                    await _posts_and_edits(http, gws[:2], room, 30, 6)
                    page = (await http.get(f"{gws[0].url}/v1/rooms/{room}/messages")).json()
                    final = {m["seq"]: m for m in page["messages"]}
                    assert sorted(final) == list(range(1, 37))
                    other = (await http.get(f"{gws[1].url}/v1/rooms/{room}/messages")).json()
                    assert other == page, "a stale page after the outage"

                    def converged() -> bool:
                        views = [view_of(ws_events(ws.frames, room))[0] for ws in wss]
                        views += [view_of(sse_events(s.events))[0] for s in sses]
                        views.append(view_of(ws_events(victim_frames + resumed.frames, room))[0])
                        return all(v == final for v in views)

                    await eventually(converged, timeout=30)
                    await asyncio.sleep(0.5)
                    resumed_reader.cancel()
                    await asyncio.gather(resumed_reader, return_exceptions=True)
                    streams = [ws_events(ws.frames, room) for ws in wss]
                    streams += [sse_events(s.events) for s in sses]
                    streams.append(ws_events(victim_frames + resumed.frames, room))
                    for events in streams:
                        view, seqs, changes = view_of(events)
                        assert view == final and seqs == list(range(1, 37))
                        assert changes == sorted(set(changes))
                for task in readers:
                    task.cancel()
                await asyncio.gather(*readers, return_exceptions=True)
    finally:
        rs.stop()


async def all_ready(http: httpx.AsyncClient, gws: list[harness.Instance]) -> bool:
    codes = [(await http.get(g.url + "/readyz")).status_code for g in gws]
    return all(c == 200 for c in codes)


async def test_embedded_store_edits_deletes_types_and_reads_with_no_servers(tmp_path):
    env = {
        "DATABASE_URL": f"sqlite:///{tmp_path}/chat.db",
        "REDIS_URL": "memory://",
        "LOG_LEVEL": "warning",
    }
    room = "solo"
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        async with (
            WSClient.connect(gw.ws_url + "?user=bo") as bo,
            WSClient.connect(gw.ws_url + "?user=ana") as ana,
        ):
            await subscribe(bo, room, changes_since=0)
            await subscribe(ana, room)
            assert (await post(http, gw.url, room, "helo", author="ana")).status_code == 201
            url = f"{gw.url}/v1/rooms/{room}/messages/1"
            r = await http.patch(
                url, json={"text": "hello", "author": "ana"}, headers={"Idempotency-Key": "fix-1"}
            )
            assert r.status_code == 200 and r.json()["version"] == 2
            r = await http.patch(
                url,
                json={"text": "hello again", "author": "ana"},
                headers={"Idempotency-Key": "fix-1"},
            )
            assert (r.status_code, r.json()["text"], r.json()["version"]) == (200, "hello", 2)
            assert (await bo.expect("message_updated"))["message"]["text"] == "hello"
            for _ in range(3):
                await ana.send({"type": "typing", "room": room})
            assert await bo.expect("typing") == {"type": "typing", "room": room, "user": "ana"}
            await ana.send({"type": "delete", "room": room, "seq": 1, "ref": "x"})
            refused = await ana.expect("error")  # open mode: the author given must match
            assert (refused["ref"], refused["code"]) == ("x", "forbidden")
            await ana.send({"type": "delete", "room": room, "seq": 1, "ref": "d", "author": "ana"})
            assert (await ana.expect("ack"))["message"]["text"] == ""
            deleted = await bo.expect("message_deleted")
            assert deleted["change"] == 2 and deleted["message"]["deleted_at"]
            assert [f for f in bo.frames if f.get("type") == "typing"] == [
                {"type": "typing", "room": room, "user": "ana"}
            ], "one per 2 s"
            r = await http.post(f"{gw.url}/v1/rooms/{room}/read", json={"seq": 1, "user": "bo"})
            assert r.json() == {"room": room, "seq": 1, "unread": 0}
        page = (await http.get(f"{gw.url}/v1/rooms/{room}/messages")).json()["messages"]
        assert [(m["seq"], m["text"], m["version"]) for m in page] == [(1, "", 3)]


async def test_a_resume_interleaves_missed_changes_in_commit_order(gateway_env):
    room = "chat.resume"
    async with instances(1, gateway_env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        url = f"{gw.url}/v1/rooms/{room}/messages"

        async def edit(seq: int, text: str | None) -> None:
            if text is None:
                r = await http.request("DELETE", f"{url}/{seq}", json={"author": "ana"})
            else:
                r = await http.patch(f"{url}/{seq}", json={"text": text, "author": "ana"})
            assert r.status_code == 200, r.text

        await post(http, gw.url, room, "m1", author="ana")
        await post(http, gw.url, room, "m2", author="ana")
        await edit(1, "m1 v2")  # change 1, after message 2
        await post(http, gw.url, room, "m3", author="ana")
        await edit(2, "m2 v2")  # change 2, after message 3
        await edit(1, None)  # change 3, after message 3
        await post(http, gw.url, room, "m4", author="ana")
        await edit(4, "m4 v2")  # change 4, after message 4
        expected = [
            ("message", 2, "m2 v2"),
            ("message", 3, "m3"),
            ("message_updated", 2, "m2 v2"),
            ("message_deleted", 1, ""),
            ("message", 4, "m4 v2"),
            ("message_updated", 4, "m4 v2"),
        ]

        def summary(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, int, str]]:
            return [
                (
                    kind,
                    (body if kind == "message" else body["message"])["seq"],
                    (body if kind == "message" else body["message"])["text"],
                )
                for kind, body in events
            ]

        # Holding message 1 and change 1: the rest, each change after the messages
        # committed before it (replayed messages already show their current text).
        async with WSClient.connect(gw.ws_url) as ws:
            subscribed = await subscribe(ws, room, since=1, changes_since=1)
            assert (subscribed["seq"], subscribed["change"]) == (4, 4)
            while len(ws_events(ws.frames, room)) < len(expected):
                await ws.recv()
            assert summary(ws_events(ws.frames, room)) == expected
            assert [
                f["change"] for f in ws.frames if "change" in f and f["type"] != "subscribed"
            ] == [2, 3, 4]
        async with SSEClient.open(
            f"{url[: -len('/messages')]}/events?changes_since=1", headers={"Last-Event-ID": "1"}
        ) as sse:
            await eventually(lambda: len(sse_events(sse.events)) >= len(expected))
            assert summary(sse_events(sse.events)) == expected
            assert [e.get("id") for e in sse.events if e.get("event") != "presence"] == [
                "2",
                "3",
                None,
                None,
                "4",
                None,
            ], "change events carry no id"


def commit_order(events: list[tuple[str, dict[str, Any]]]) -> list[tuple[str, int]]:
    """A subscriber's frames as ("m", seq) and ("c", change), in the order received."""
    return [
        ("m", body["seq"]) if kind == "message" else ("c", body["change"]) for kind, body in events
    ]


async def test_messages_and_changes_reach_subscribers_in_commit_order(gateway_env, pg_url):
    """Posts and edits interleave on one room through three instances, one of which
    never publishes (as if killed after each commit): a message committed right
    after a change must not overtake it, whether the change arrives live or only
    from the store. Every subscriber's frames follow the store's commit order."""
    room = "chat.order"
    rounds = 12
    env_a = {**gateway_env, "FAULT_SKIP_PUBLISH": "1"}
    async with (
        instances(1, env_a) as (a,),
        instances(2, gateway_env) as (b, c),
        httpx.AsyncClient(timeout=30) as http,
    ):
        assert (await post(http, b.url, room, "m0", author="ana")).status_code == 201
        latest = 1

        async def edit(gw: harness.Instance, seq: int, text: str) -> None:
            r = await http.patch(
                f"{gw.url}/v1/rooms/{room}/messages/{seq}", json={"text": text, "author": "ana"}
            )
            assert r.status_code == 200, r.text

        async def posted(gw: harness.Instance, text: str) -> int:
            r = await post(http, gw.url, room, text, author="ana")
            assert r.status_code == 201, r.text
            return int(r.json()["seq"])

        async with (
            WSClient.connect(c.ws_url) as ws,
            SSEClient.open(f"{b.url}/v1/rooms/{room}/events?since=0&changes_since=0") as sse,
        ):
            await subscribe(ws, room, since=0, changes_since=0)
            task = asyncio.create_task(reading(ws))
            for i in range(rounds):
                # A change that reaches no one live, then a post that does.
                await edit(a, latest, f"edit {i} by a")
                latest = max(latest, await posted(b, f"m{i} after a's edit"))
                # A change and posts racing for the room's lock.
                seqs = await asyncio.gather(
                    edit(b, latest, f"edit {i} by b"),
                    posted(c, f"m{i} racing c"),
                    posted(b, f"m{i} racing b"),
                )
                latest = max(latest, *(s for s in seqs if s is not None))
            conn = await asyncpg.connect(pg_url)
            try:
                changes = await conn.fetch(
                    "SELECT change, after_seq FROM message_changes WHERE room = $1", room
                )
            finally:
                await conn.close()
            assert len(changes) == 2 * rounds
            expected = sorted(
                [(("m", s), (s, 0, 0)) for s in range(1, latest + 1)]
                + [(("c", r["change"]), (r["after_seq"], 1, r["change"])) for r in changes],
                key=lambda e: e[1],
            )
            order = [e[0] for e in expected]
            await eventually(
                lambda: len(commit_order(ws_events(ws.frames, room))) >= len(order), 30
            )
            await eventually(lambda: len(commit_order(sse_events(sse.events))) >= len(order), 30)
            await asyncio.sleep(0.5)  # nothing more may come
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert commit_order(ws_events(ws.frames, room)) == order
            assert commit_order(sse_events(sse.events)) == order
