"""Chat's part in the store and the history cache: edits and deletes numbered as
changes with tombstones kept, change idempotency keys, read positions that never
move back (on Postgres and SQLite alike), and a change voiding every instance's
cached window."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from chat_gateway.redisio.context import RedisContext
from chat_gateway.storage import (
    MessageNotFound,
    NotAuthor,
    RedisHistoryCache,
    create_store,
)
from tests import harness


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
    a = RedisHistoryCache(store, RedisContext.of(client), prefix=redis_prefix)
    b = RedisHistoryCache(store, RedisContext.of(client), prefix=redis_prefix)
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


async def test_the_store_filters_read_positions_by_name_and_prefix(store):
    from chat_gateway.storage import RoomFilter

    for room in ("a-1", "b-1", "b-2", "c", "c-1"):
        await store.append(room, "ana", "x")
        await store.mark_read("ana", room, 1)
    keep = RoomFilter(names=("c",), prefixes=("b-",))
    got = await store.read_positions("ana", limit=2, rooms=keep)
    assert [p.room for p in got] == ["b-1", "b-2"]
    got = await store.read_positions("ana", rooms=keep)
    assert [p.room for p in got] == ["b-1", "b-2", "c"]
    got = await store.read_positions("ana", rooms=RoomFilter(prefixes=("b_",)))
    assert got == []  # a prefix is text, not a LIKE pattern
    assert len(await store.read_positions("ana")) == 5
