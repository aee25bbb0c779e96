"""A removed message's text leaves the webhook outbox with it.

A delete, a purge and retention take the text out of every event of the message
(pending, delivered and kept, dead) in their own transaction, on Postgres and
SQLite alike; then the whole path on a real gateway: a dead letter listed and
replayed after a delete carries no text.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson
import redis.asyncio as aioredis

from chat_gateway.storage import Store
from chat_gateway.storage.base import format_ts
from chat_gateway.storage.postgres import PostgresStore
from chat_gateway.storage.sqlite import SQLiteStore
from tests import harness
from tests.harness import Instance, eventually, post
from tests.system.test_webhooks import AUTH, Receiver, hook_env, new_secret

SECRET = "the launch code is 0000"


async def outbox_rows(store: Store) -> list[tuple[str, int, int, dict[str, Any]]]:
    """Every outbox row as it is stored: (type, seq, state, data)."""
    query = "SELECT type, seq, state, data FROM webhook_outbox ORDER BY id"
    if isinstance(store, PostgresStore):
        rows = await store._call("fetch", query)
    elif isinstance(store, SQLiteStore):
        rows = await store._run(lambda db: db.execute(query).fetchall())
    else:
        raise TypeError(f"no outbox on {type(store).__name__}")
    return [(r[0], r[1], r[2], orjson.loads(r[3])) for r in rows]


def carrying(rows: list[tuple[str, int, int, dict[str, Any]]], words: str) -> list[Any]:
    return [r for r in rows if words in orjson.dumps(r[3]).decode()]


async def test_a_delete_scrubs_its_text_from_every_earlier_event_in_any_state(store):
    outbox = store.outbox()
    (endpoint,) = await outbox.register(["https://a.example/"])
    store.write_outbox([endpoint.id])
    msg, _ = await store.append("r", "ana", SECRET)
    await store.append("r", "bo", "keep me")
    await store.change("r", msg.seq, SECRET + ", revised", author=None)
    # The message.created delivered (kept for replays), the next one delivered, the
    # edit's message.updated dead.
    (head,) = await outbox.claim([endpoint.id], 10, lease=30)
    following = await outbox.delivered(head, 200, lease=30, chain=True)
    assert following is not None and following.seq == 2
    edit = await outbox.delivered(following, 200, lease=30, chain=True)
    assert edit is not None and edit.type == "message.updated"
    await outbox.dead(edit, 500, "HTTP 500")
    assert len(carrying(await outbox_rows(store), SECRET)) == 2

    change, tomb = await store.change("r", msg.seq, None, author=None)
    assert change is not None and tomb.deleted_ms is not None
    rows = await outbox_rows(store)
    assert carrying(rows, "launch code") == [], rows
    deleted_at = format_ts(tomb.deleted_ms)
    assert [
        (kind, state, data["text"], data.get("deleted_at")) for kind, seq, state, data in rows
    ] == [
        ("message.created", 1, "", deleted_at),
        ("message.created", 1, "keep me", None),
        ("message.updated", 2, "", deleted_at),
        ("message.deleted", 0, "", deleted_at),
    ]
    # Every other field of the earlier events stays as it was.
    created = rows[0][3]
    assert (created["id"], created["author"], created["seq"]) == (msg.id, "ana", msg.seq)
    assert rows[2][3]["version"] == 2 and rows[2][3]["change"] == 1

    # What an operator lists and replays, and what a receiver is sent, has no text.
    letters = await outbox.dead_letters(limit=10)
    assert len(letters) == 1 and orjson.loads(letters[0].data)["text"] == ""
    assert await outbox.replay(since_ms=0) == 3
    sent = []
    for _ in range(4):
        for d in await outbox.claim([endpoint.id], 10, lease=30):
            sent.append(d)
            await outbox.delivered(d, 200, lease=30, chain=False)
    assert len(sent) == 4 and not [d for d in sent if "launch code" in d.data]


async def test_a_purge_and_retention_scrub_the_text_of_what_they_remove(store):
    outbox = store.outbox()
    (endpoint,) = await outbox.register(["https://a.example/"])
    store.write_outbox([endpoint.id])
    for room in ("purged", "old"):
        await store.append(room, "ana", SECRET)
        await store.change(room, 1, SECRET + " (edited)", author=None)
        await store.append(room, "ana", "second " + SECRET)
    (head, _other) = sorted(await outbox.claim([endpoint.id], 10, lease=30), key=lambda d: d.room)
    assert head.room == "old"
    await outbox.dead(head, 500, "HTTP 500")
    before = await outbox_rows(store)
    assert len(carrying(before, "launch code")) == 6

    assert await store.purge_room("purged") == 2
    rows = await outbox_rows(store)
    assert [r for r in carrying(rows, "launch code") if r[3]["room"] == "purged"] == []
    assert len(carrying(rows, "launch code")) == 3, "another room's events keep their text"

    far = int(time.time() * 1000) + 86_400_000
    assert await store.delete_before(far, 100) == 2
    rows = await outbox_rows(store)
    assert carrying(rows, "launch code") == [], rows
    # The events stay (retention never drops an undelivered one), in their states.
    assert [(kind, state) for kind, _, state, _ in rows] == [
        (kind, state) for kind, _, state, _ in before
    ]
    assert all(data["text"] == "" and data["deleted_at"] for *_, data in rows)
    (letter,) = await outbox.dead_letters(limit=10)
    assert orjson.loads(letter.data)["text"] == ""


async def test_a_dead_letter_listed_and_replayed_after_a_delete_carries_no_text(gateway_env):
    failing = True
    receiver = await Receiver(
        [new_secret()], answer=lambda hit: (500 if failing else 204, {}, 0.0)
    ).start()
    gw = Instance(hook_env(gateway_env, receiver, WEBHOOK_MAX_ATTEMPTS="1")).start()
    try:
        await gw.wait_ready()
        async with httpx.AsyncClient(base_url=gw.url, headers=AUTH, timeout=20) as client:
            r = await post(client, gw.url, "priv", SECRET, author="ana")
            assert r.status_code == 201, r.text
            msg = r.json()

            async def dead() -> list[dict[str, Any]] | None:
                got = (await client.get("/v1/admin/webhooks/dead")).json()["dead"]
                return got if len(got) == want else None

            want = 1
            (letter,) = await eventually(dead, 20)
            assert letter["payload"]["data"]["text"] == SECRET
            r = await client.request("DELETE", f"/v1/rooms/priv/messages/{msg['seq']}")
            assert r.status_code == 200 and r.json()["text"] == "", r.text
            want = 2  # the delete's own event dies too
            letters = await eventually(dead, 20)
            assert [d["type"] for d in letters] == ["message.deleted", "message.created"]
            assert "launch code" not in orjson.dumps(letters).decode()
            assert letters[1]["payload"]["data"]["deleted_at"] == r.json()["deleted_at"]

            failing = False
            sent_before = len(receiver.hits)
            r = await client.post(
                "/v1/admin/webhooks/replay", json={"ids": [d["id"] for d in letters]}
            )
            assert r.status_code == 202 and r.json()["replayed"] == 2
            await eventually(lambda: len(receiver.delivered()) == 2, 20)
            replayed = receiver.hits[sent_before:]
            assert [h.payload["type"] for h in replayed] == ["message.created", "message.deleted"]
            assert not [h for h in replayed if b"launch code" in h.body]
            assert receiver.unverified == []
    finally:
        gw.stop()
        await receiver.stop()


async def test_no_redis_key_holds_a_deleted_text(gateway_env, redis_prefix):
    """The history cache held the page with the text; after the delete no key under
    the gateway's prefix (pages, seq and change keys) carries it."""
    gw = Instance(gateway_env).start()
    client = aioredis.from_url(harness.REDIS_URL)
    try:
        await gw.wait_ready()
        async with httpx.AsyncClient(base_url=gw.url, timeout=20) as http:
            r = await post(http, gw.url, "priv", SECRET, author="ana")
            assert r.status_code == 201, r.text
            for _ in range(2):  # a cold load writes the page, a warm read serves it
                page = (await http.get("/v1/rooms/priv/messages")).json()["messages"]
                assert page[0]["text"] == SECRET

            async def holding() -> list[bytes]:
                found = []
                async for key in client.scan_iter(match=f"{redis_prefix}*"):
                    kind = await client.type(key)
                    if kind == b"string":
                        values = [await client.get(key) or b""]
                    elif kind == b"hash":
                        values = list((await client.hgetall(key)).values())
                    else:
                        continue
                    if any(b"launch code" in v for v in values):
                        found.append(key)
                return found

            assert await holding(), "the page was cached with the text"
            r = await http.request("DELETE", "/v1/rooms/priv/messages/1", json={"author": "ana"})
            assert r.status_code == 200, r.text
            assert await holding() == []
            page = (await http.get("/v1/rooms/priv/messages")).json()["messages"]
            assert page[0]["text"] == "" and page[0]["deleted_at"]
            assert await holding() == [], "the page cached again holds the tombstone"
    finally:
        await client.aclose()
        gw.stop()
