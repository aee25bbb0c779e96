"""The store's state-room contract (Store.write_state, state, purge_tombstones), on
Postgres and on the embedded SQLite file alike."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from chat_gateway.storage.moderation import Action, Restricted


async def test_writes_take_the_rooms_seqs_and_reads_show_each_keys_newest(store):
    msg, _ = await store.append("r", "ana", "a message first")
    assert msg.seq == 1
    written = await store.write_state("r", [("a", b"1"), ("b", b'{"x":[1,2]}'), ("c", None)])
    assert [(e.key, e.seq) for e in written] == [("a", 2), ("b", 3), ("c", 4)]
    (again,) = await store.write_state("r", [("a", b"null")])
    assert again.seq == 5
    assert await store.latest_seq("r") == 5, "one counter for messages and writes"

    snap = await store.state("r")
    assert snap.seq == 5 and snap.purged_seq == 0
    assert [(e.key, e.seq) for e in snap.entries] == [("b", 3), ("c", 4), ("a", 5)]
    assert orjson.loads(snap.entries[0].value) == {"x": [1, 2]}
    assert snap.entries[1].deleted and snap.entries[2].value is not None
    assert orjson.loads(snap.entries[2].value) is None, "JSON null is a value, not a delete"

    after = await store.state("r", after=3)
    assert [e.seq for e in after.entries] == [4, 5] and after.seq == 5
    empty = await store.state("never")
    assert empty.seq == 0 and empty.entries == []


async def test_concurrent_writes_get_distinct_gapless_seqs(store):
    done = await asyncio.gather(
        *(store.write_state("busy", [(f"k{i}", b"%d" % i), (f"j{i}", None)]) for i in range(30))
    )
    seqs = sorted(e.seq for entries in done for e in entries)
    assert seqs == list(range(1, 61))
    for entries in done:
        assert entries[1].seq == entries[0].seq + 1, "one call's writes are contiguous"


async def test_a_banned_or_muted_writer_is_refused_and_nothing_is_written(store):
    await store.write_state("m", [("a", b"1")])
    await store.moderate("m", Action("banned", by="mod", user="eve"))
    await store.moderate("m", Action("muted", by="mod", user="max"))
    for who in ("eve", "max"):
        with pytest.raises(Restricted):
            await store.write_state("m", [("a", b"2"), ("b", b"3")], author=who)
    snap = await store.state("m")
    assert snap.seq == 1 and [(e.key, e.value) for e in snap.entries] == [("a", b"1")]
    (ok,) = await store.write_state("m", [("a", b"4")], author="ana")
    assert ok.seq == 2


async def test_purging_tombstones_raises_the_rooms_purged_seq(store):
    await store.write_state("p", [("a", b"1"), ("b", None), ("c", None)])  # 1, 2, 3
    await store.write_state("q", [("z", None)])
    assert await store.purge_tombstones(0, 100) == 0, "none written before the epoch"
    await asyncio.sleep(0.01)
    cutoff = int(time.time() * 1000)
    await asyncio.sleep(0.01)
    (later,) = await store.write_state("p", [("d", None)])  # seq 4, kept below
    await store.write_state("p", [("b", b"5")])  # b lives again at seq 5
    purged = await store.purge_tombstones(cutoff, 100)
    assert purged == 2, "c in p and z in q (b was written again)"
    p = await store.state("p")
    assert p.purged_seq == 3
    assert [(e.key, e.seq) for e in p.entries] == [("a", 1), ("d", 4), ("b", 5)]
    assert (await store.state("q")).purged_seq == 1
    assert p.seq == 5 and later.seq == 4
