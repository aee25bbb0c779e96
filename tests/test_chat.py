"""Chat on top of messages: edits and deletes, typing, read state.

The store's part on Postgres and SQLite alike, then the whole path on three real
gateway processes: every subscriber's view (its messages, with the changes it was
sent applied in order) must equal the store's final state, with contiguous seqs.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import pytest

from storage import MessageNotFound, NotAuthor, Store, create_store
from tests import harness


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
