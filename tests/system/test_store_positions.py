"""``Store.latest_seqs``: the positions of many rooms in one query, on Postgres and on
the embedded SQLite file alike (the position check reads them from the store)."""

from __future__ import annotations


async def test_latest_seqs_of_many_rooms_match_each_rooms_latest_seq(store):
    for i in range(3):
        await store.append("a", "ana", f"a{i}")
    await store.append("b", "bo", "b0")
    await store.append_many([("c", "cy", "c0"), ("a", "ana", "a3")])
    # More rooms than one SQLite IN list takes, most of them without a message.
    rooms = ["a", "b", "c", *(f"empty{i}" for i in range(700)), 'it\'s "odd" 🙂']
    seqs = await store.latest_seqs(rooms)
    assert set(seqs) == set(rooms)
    assert (seqs["a"], seqs["b"], seqs["c"]) == (4, 1, 1)
    assert all(seqs[r] == 0 for r in rooms[3:])
    for room in ("a", "b", "c", "empty0"):
        assert seqs[room] == await store.latest_seq(room)
    assert await store.latest_seqs([]) == {}
