"""``Store.latest_seqs``: the positions of many rooms in one query, on Postgres and on
the embedded SQLite file alike (the position check reads them from the store)."""

from __future__ import annotations

from typing import AsyncIterator

import pytest

from storage import Store, create_store
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


async def test_latest_seqs_of_many_rooms_match_each_rooms_latest_seq(store):
    for i in range(3):
        await store.append("a", "ana", f"a{i}")
    await store.append("b", "bo", "b0")
    await store.append_many([("c", "cy", "c0"), ("a", "ana", "a3")])
    # More rooms than one SQLite IN list takes, most of them without a message.
    rooms = ["a", "b", "c", *(f"empty{i}" for i in range(700)), "it's \"odd\" 🙂"]
    seqs = await store.latest_seqs(rooms)
    assert set(seqs) == set(rooms)
    assert (seqs["a"], seqs["b"], seqs["c"]) == (4, 1, 1)
    assert all(seqs[r] == 0 for r in rooms[3:])
    for room in ("a", "b", "c", "empty0"):
        assert seqs[room] == await store.latest_seq(room)
    assert await store.latest_seqs([]) == {}
