"""Search in the store: the same answers from Postgres and SQLite (the shared table
in tests/search_cases.py), rooms limited in the query, deleted and edited
messages, paging and the time bound."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from chat_gateway.storage import Message, Store
from chat_gateway.storage.postgres import PostgresStore
from chat_gateway.storage.search import (
    Cursor,
    RoomScope,
    SearchTimeout,
    parse_query,
)
from chat_gateway.storage.sqlite import SQLiteStore
from tests.search_cases import CASES, MESSAGES, SCOPED

EVERYTHING = RoomScope(everything=True)


async def post_all(store: Store) -> list[Message]:
    out = []
    for room, text in MESSAGES:
        msg, _ = await store.append(room, "ann", text)
        out.append(msg)
        await asyncio.sleep(0.002)  # distinct creation times: a stable order to expect
    return out


async def found(store: Store, q: str, scope: RoomScope = EVERYTHING, limit: int = 50) -> list[str]:
    page = await store.search(parse_query(q), scope, limit=limit)
    return [m.id for m in page.messages]


async def test_shared_table_of_queries(store: Store) -> None:
    posted = await post_all(store)
    for q, expected in CASES:
        assert await found(store, q) == [posted[i].id for i in expected], q


async def test_rooms_from_token_patterns_limit_the_query(store: Store) -> None:
    posted = await post_all(store)
    for rooms, read_rooms, q, expected in SCOPED:
        scope = RoomScope.of_patterns(rooms, read_rooms)
        assert await found(store, q, scope) == [posted[i].id for i in expected], (rooms, q)


async def test_the_scope_applies_before_the_limit(store: Store) -> None:
    # Many newer matches elsewhere; the one in the caller's room is still found.
    old, _ = await store.append("mine", "ann", "needle in my room")
    for i in range(30):
        await store.append(f"other-{i % 3}", "bob", f"needle number {i}")
    assert await found(store, "needle", RoomScope(names=("mine",)), limit=5) == [old.id]


async def test_excluded_rooms_are_left_out(store: Store) -> None:
    posted = await post_all(store)
    scope = RoomScope(everything=True, excluded=("general",))
    assert await found(store, "meeting", scope) == [posted[9].id, posted[2].id]


async def test_deleted_never_found_edited_only_by_current_text(store: Store) -> None:
    a, _ = await store.append("r", "ann", "alpha original words")
    b, _ = await store.append("r", "ann", "alpha doomed words")
    await store.change("r", a.seq, "alpha rewritten", author=None)
    await store.change("r", b.seq, None, author=None)
    assert await found(store, "original") == []
    assert await found(store, "doomed") == []
    assert await found(store, "rewritten") == [a.id]
    page = await store.search(parse_query("alpha"), EVERYTHING, limit=10)
    assert [m.text for m in page.messages] == ["alpha rewritten"]


async def test_purged_and_expired_rooms_find_nothing(store: Store) -> None:
    await store.append("gone", "ann", "vanishing act")
    await store.append("old", "ann", "vanishing too")
    await store.purge_room("gone")
    await asyncio.sleep(0.01)
    await store.delete_before(int(time.time() * 1000) + 1000, 100)
    assert await found(store, "vanishing") == []


async def test_cursor_pages_newest_first_stable_under_new_posts(store: Store) -> None:
    posted = [(await store.append(f"r{i % 3}", "ann", f"page word {i}"))[0] for i in range(7)]
    # newest first; posts of the same millisecond by room, then seq, descending
    ids = [m.id for m in sorted(posted, key=lambda m: (m.created_ms, m.room, m.seq))]
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.search(parse_query("page"), EVERYTHING, limit=3, cursor=cursor)
        seen += [m.id for m in page.messages]
        # posts arriving between pages shift nothing: no page repeats or skips a
        # message (one of the cursor's own millisecond may still come after it)
        await store.append("r0", "ann", "page word late")
        if not page.has_more:
            break
        cursor = Cursor.after(page.messages[-1])
    assert len(seen) == len(set(seen))
    assert [i for i in seen if i in set(ids)] == list(reversed(ids))


async def test_a_slow_search_is_cancelled_and_the_store_still_answers(store: Store) -> None:
    await store.append("big", "ann", "word one")
    if isinstance(store, PostgresStore):
        # A search held up (here by a lock on the table) runs into its statement
        # timeout; the connection goes back to the pool usable.
        async with store.pool.acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            with pytest.raises(SearchTimeout):
                await store.search(parse_query("word"), EVERYTHING, limit=10, timeout=0.2)
    else:
        assert isinstance(store, SQLiteStore)
        # Enough rows that a one-letter prefix takes many steps: the progress
        # handler ends it at the deadline.
        db = sqlite3.connect(store.path)
        with db:
            db.executemany(
                "INSERT INTO messages (room, seq, id, author, text, created_ms) "
                "VALUES ('bulk', ?, ?, 'ann', ?, ?)",
                [(i, f"b{i}", f"a{i} ab{i} abc{i} word{i}", i) for i in range(1, 3000)],
            )
        db.close()
        with pytest.raises(SearchTimeout):
            await store.search(parse_query("a"), EVERYTHING, limit=10, timeout=0.000_001)
    for _ in range(3):  # every pooled connection still works
        assert len(await found(store, "one")) == 1


async def test_search_language_reindexes(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    await store.start()
    try:
        await store.migrate()
        msg, _ = await store.append("r", "ann", "the dog was running")
        assert await found(store, "runs") == []  # simple: words as written
    finally:
        await store.close()
    store = PostgresStore(pg_url, search_language="english")
    await store.start()
    try:
        await store.migrate()  # re-indexes the stored message with stems
        assert await found(store, "runs") == [msg.id]
        again, _ = await store.append("r", "ann", "cats jumped")
        assert await found(store, "jumping cat") == [again.id]
    finally:
        await store.close()


@pytest.mark.parametrize(
    "recent_rows, few",
    [(0, 10**9), (0, -1), (3, 10**9), (10**6, -1)],
    ids=["index-first", "newest-first", "recent-then-index", "recent"],
)
async def test_every_way_to_the_matches_answers_alike(
    pg_url: str, recent_rows: int, few: int
) -> None:
    # Postgres finds matches among the newest rows, or by the words' index, or by
    # walking newest first, whichever is quickest for the words: each way gives
    # the shared table's answers, scoped and paged one message at a time.
    store = PostgresStore(pg_url)
    await store.start()
    try:
        await store.migrate()
        store.search_recent_rows, store.search_few = recent_rows, few
        posted = await post_all(store)
        for q, expected in CASES:
            assert await found(store, q) == [posted[i].id for i in expected], q
        for rooms, read_rooms, q, expected in SCOPED:
            scope = RoomScope.of_patterns(rooms, read_rooms)
            seen: list[str] = []
            cursor = None
            while True:
                page = await store.search(parse_query(q), scope, limit=1, cursor=cursor)
                seen += [m.id for m in page.messages]
                if not page.has_more:
                    break
                cursor = Cursor.after(page.messages[-1])
            assert seen == [posted[i].id for i in expected], (rooms, read_rooms, q)
    finally:
        await store.close()
