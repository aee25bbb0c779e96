"""The store contract, on Postgres and on the embedded SQLite file alike."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from chat_gateway.storage import Store, create_store, migrations
from chat_gateway.storage.postgres import PostgresStore
from tests import harness


def versions(dialect: str) -> list[str]:
    """Every migration of the dialect, in order: what a new database gets."""
    return [version for version, _ in migrations.load(dialect)]


@pytest.fixture(params=["postgres", "sqlite"])
async def store(request, tmp_path) -> AsyncIterator[Store]:
    if request.param == "postgres":
        url = await harness.create_database()
    else:
        url = f"sqlite:///{tmp_path}/store.db"
    s = create_store(url)
    await s.start()
    try:
        assert await s.migrate() == versions(request.param)
        assert await s.migrate() == [], "migrations apply once"
        yield s
    finally:
        await s.close()
        if request.param == "postgres":
            await harness.drop_database(url)


async def test_seq_per_room_starts_at_one_without_gaps(store):
    for i in range(5):
        msg, created = await store.append("a", "ana", f"a{i}")
        assert created and msg.seq == i + 1 and msg.room == "a"
    msg, _ = await store.append("b", "bo", "b0")
    assert msg.seq == 1
    assert await store.latest_seq("a") == 5
    assert await store.latest_seq("b") == 1
    assert await store.latest_seq("never") == 0


async def test_concurrent_appends_get_distinct_gapless_seqs(store):
    results = await asyncio.gather(*(store.append("busy", "w", f"m{i}") for i in range(60)))
    assert sorted(m.seq for m, _ in results) == list(range(1, 61))
    assert len({m.id for m, _ in results}) == 60


async def test_a_row_the_store_refuses_fails_only_its_own_post(store):
    """Posts without a key commit in groups on Postgres. A row the database refuses
    (an author with a NUL or a lone surrogate, sent straight to the store past the
    gateway's checks) fails its own post only: every innocent post of its group
    commits, and seqs stay gapless."""
    bad_authors = ["nul\x00author", "lone\ud800surrogate"]
    for round_ in range(3):
        posts = [("grp" + str(i % 3), f"user{i}", f"r{round_} m{i}") for i in range(30)]
        bad = [("grp" + str(i), author, "bad") for i, author in enumerate(bad_authors)]
        everything = posts[:10] + bad[:1] + posts[10:20] + bad[1:] + posts[20:]
        answers = await asyncio.gather(
            *(store.append(room, author, text) for room, author, text in everything),
            return_exceptions=True,
        )
        by_post = dict(zip(everything, answers, strict=True))
        failed = [p for p in posts if isinstance(by_post[p], BaseException)]
        assert failed == [], [by_post[p] for p in failed]
        if isinstance(store, PostgresStore):
            assert all(isinstance(by_post[p], asyncpg.DataError) for p in bad), [
                by_post[p] for p in bad
            ]
    for room in ("grp0", "grp1", "grp2"):
        seqs = [m.seq for m in (await store.history(room, limit=200)).messages]
        assert seqs == list(range(1, len(seqs) + 1)), (room, seqs)
        assert len(seqs) >= 30, "every innocent post is stored"


async def test_idempotency_key_returns_the_first_message(store):
    first, created = await store.append("r", "ana", "hello", "k1")
    again, created_again = await store.append("r", "ana", "different text", "k1")
    assert created and not created_again
    assert again == first
    other_room, created_other = await store.append("s", "ana", "hello", "k1")
    assert created_other and other_room.seq == 1
    nxt, _ = await store.append("r", "ana", "next")
    assert nxt.seq == 2, "a repeat must not consume a seq"


async def test_concurrent_idempotent_appends_store_one(store):
    results = await asyncio.gather(*(store.append("r", "ana", "x", "same") for _ in range(20)))
    assert sum(created for _, created in results) == 1
    assert {m.id for m, _ in results} == {results[0][0].id}
    assert await store.latest_seq("r") == 1


async def test_history_pages(store):
    for i in range(1, 13):
        await store.append("h", "ana", f"t{i}")
    latest = await store.history("h", limit=5)
    assert [m.seq for m in latest.messages] == [8, 9, 10, 11, 12] and latest.has_more
    before = await store.history("h", limit=5, before=8)
    assert [m.seq for m in before.messages] == [3, 4, 5, 6, 7] and before.has_more
    first = await store.history("h", limit=5, before=3)
    assert [m.seq for m in first.messages] == [1, 2] and not first.has_more
    after = await store.history("h", limit=5, after=9)
    assert [m.seq for m in after.messages] == [10, 11, 12] and not after.has_more
    window = await store.history("h", limit=2, after=2, before=9)
    assert [m.seq for m in window.messages] == [3, 4] and window.has_more
    all_ = await store.history("h", limit=200)
    assert [m.text for m in all_.messages] == [f"t{i}" for i in range(1, 13)]
    assert all_.messages[0].to_dict()["created_at"].endswith("Z")


async def test_messages_round_trip_unicode_and_timestamps(store):
    msg, _ = await store.append("u", "zoë", "héllo 👋 — ok")
    page = await store.history("u")
    assert page.messages == [msg]


async def test_postgres_migrations_race_safely(pg_url):
    stores = [create_store(pg_url) for _ in range(4)]
    for s in stores:
        await s.start()
    try:
        applied = await asyncio.gather(*(s.migrate() for s in stores))
        assert sorted(applied) == [[], [], [], versions("postgres")]
    finally:
        for s in stores:
            await s.close()


async def test_postgres_stalled_group_holds_only_its_own_room(pg_url):
    """A group waiting on a room's lock (another instance writing it) does not hold
    the posts of other rooms: a second flight takes them; the stalled one commits
    once the lock goes, with seqs unbroken."""
    import asyncpg

    from chat_gateway.storage.postgres import GROUP_STALL

    store = create_store(pg_url)
    await store.start()
    await store.migrate()
    locker = await asyncpg.connect(pg_url)
    try:
        first, _ = await store.append("hot", "ana", "before the lock")
        tx = locker.transaction()
        await tx.start()
        await locker.execute("SELECT * FROM rooms WHERE room = 'hot' FOR UPDATE")
        stalled = asyncio.create_task(store.append("hot", "ana", "behind the lock"))
        await asyncio.sleep(GROUP_STALL * 3)
        assert not stalled.done(), "the room's row lock must hold its post"
        other, created = await asyncio.wait_for(store.append("cold", "bo", "elsewhere"), 5)
        assert created and other.seq == 1
        assert not stalled.done()
        await tx.rollback()
        behind, _ = await asyncio.wait_for(stalled, 5)
        assert (first.seq, behind.seq) == (1, 2)
        after, _ = await store.append("hot", "ana", "after")
        assert after.seq == 3
    finally:
        await locker.close()
        await store.close()


async def change_rows(store: Store) -> list[tuple[str, int, int]]:
    """Every (room, change, seq) row of message_changes, read straight from the table."""
    query = "SELECT room, change, seq FROM message_changes ORDER BY room, change"
    url = getattr(store, "url", None)
    if url is not None:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(r) for r in await conn.fetch(query)]
        finally:
            await conn.close()
    db = sqlite3.connect(store.path)  # type: ignore[attr-defined]
    try:
        return [tuple(r) for r in db.execute(query).fetchall()]
    finally:
        db.close()


async def test_purge_and_retention_delete_the_change_rows_of_their_messages(store):
    for room in ("gone", "kept"):
        for i in range(3):
            await store.append(room, "ana", f"{room} {i}")
        await store.change(room, 1, "edited", author=None)
        await store.change(room, 2, None, author=None)
    assert await store.purge_room("gone") == 3
    assert await change_rows(store) == [("kept", 1, 1), ("kept", 2, 2)]
    # The change counter survives the purge: numbers are never handed out again.
    await store.append("gone", "ana", "after the purge")
    change, _ = await store.change("gone", 4, "edited again", author=None)
    assert change is not None and change.change == 3
    assert await change_rows(store) == [("gone", 3, 4), ("kept", 1, 1), ("kept", 2, 2)]
    # Retention in batches: each batch takes its messages' change rows with it.
    future = int(time.time() * 1000) + 60_000
    assert await store.delete_before(future, 2) == 2  # the two oldest
    left = await change_rows(store)
    remaining = {
        (m.room, m.seq)
        for room in ("gone", "kept")
        for m in (await store.history(room, limit=10)).messages
    }
    assert {(room, seq) for room, _, seq in left} <= remaining
    assert await store.delete_before(future, 100) == 2
    assert await change_rows(store) == []
