"""Search: latency of full-text queries on a large messages table, what the index
costs posts, and how long the search migration takes on a table already full.

In a throwaway Postgres database:

1. Migrations up to search, then MESSAGES messages over ROOMS rooms in one
   ``INSERT … SELECT generate_series``, eight words each from a list of WORDS
   made-up words drawn log-uniformly (a few words very common, most rare).
2. The search migration on that table (``PostgresStore.migrate``: the column and
   trigger, then the batched fill and ``CREATE INDEX CONCURRENTLY``), timed,
   while a writer keeps posting: its slowest post shows whether writers were
   locked out.
3. p50/p99 of one-word, two-word, phrase and prefix queries, for a caller who
   may read every room and one who may read 10.
4. Posts/s with the search trigger and index, then without both.
"""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import asyncpg

from bench.stats import summary_ms
from chat_gateway.storage import migrations
from chat_gateway.storage.postgres import PostgresStore
from chat_gateway.storage.search import RoomScope, parse_query
from tests.harness import create_database, drop_database

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "gu", "be", "fi"]


def words(n: int) -> list[str]:
    """``n`` distinct made-up words of two to four syllables."""
    rng = random.Random(7)
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))] = None
    return list(out)


async def premigrate(conn: asyncpg.Connection) -> None:
    """Every migration before search's, as the store would have applied them."""
    await conn.execute(
        "CREATE TABLE schema_migrations (version text PRIMARY KEY, "
        "applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for version, sql in migrations.load("postgres"):
        if version >= "0010":
            break
        async with conn.transaction():
            await conn.execute(sql)
            await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)


async def bulk_load(conn: asyncpg.Connection, vocab: list[str], total: int, rooms: int) -> float:
    t0 = time.perf_counter()
    start_ms = int(time.time() * 1000) - total
    await conn.execute(
        "INSERT INTO messages (room, seq, id, author, text, created_at) "
        "SELECT 'room-' || (g % $2), g / $2 + 1, 'b' || g, 'bench', "
        " (SELECT string_agg(w, ' ') FROM (SELECT ($3::text[])[floor(power("
        "  array_length($3::text[], 1), random()))::int] AS w"
        "  FROM generate_series(1, 8) WHERE g >= 0) AS eight), "
        " to_timestamp(($4::bigint + g)::double precision / 1000) "
        "FROM generate_series(0, $1 - 1) g",
        total,
        rooms,
        vocab,
        start_ms,
    )
    await conn.execute(
        "INSERT INTO rooms (room, last_seq) SELECT 'room-' || r, ($1 - 1) / $2 + 1 "
        "FROM generate_series(0, $2 - 1) r",
        total,
        rooms,
    )
    await conn.execute("ANALYZE messages")
    return time.perf_counter() - t0


async def poster(store: PostgresStore, stop: asyncio.Event, rooms: int) -> list[float]:
    durations = []
    n = 0
    while not stop.is_set():
        t0 = time.perf_counter()
        await store.append(f"room-{n % rooms}", "writer", f"posted during migration {n}")
        durations.append(time.perf_counter() - t0)
        n += 1
        await asyncio.sleep(0.01)
    return durations


async def posts_per_s(store: PostgresStore, rooms: int, total: int, concurrency: int) -> float:
    async def writer(k: int) -> None:
        for n in range(k, total, concurrency):
            await store.append(f"room-{n % rooms}", "bench", f"kalo mine rusa {n} tivo zepa")

    t0 = time.perf_counter()
    await asyncio.gather(*(writer(k) for k in range(concurrency)))
    return round(total / (time.perf_counter() - t0), 1)


def queries(vocab: list[str], kind: str, n: int) -> list[str]:
    """``n`` queries of ``kind``, words drawn as the messages drew them."""
    rng = random.Random(kind)

    def word() -> str:
        return vocab[int(len(vocab) ** rng.random()) % len(vocab)]

    out = []
    for _ in range(n):
        if kind == "one-word":  # quoted: the word alone, not as a prefix too
            out.append(f'"{word()}"')
        elif kind == "two-word":
            out.append(f'{word()} "{word()}"')
        elif kind == "phrase":
            out.append(f'"{word()} {word()}"')
        else:  # prefix: the first syllables of a word, as typed
            out.append(word()[:3])
    return out


async def run(
    *, messages: int, rooms: int, words_count: int, queries_each: int, posts: int
) -> list[dict[str, Any]]:
    url = await create_database(tag="cgbench")
    rows: list[dict[str, Any]] = []
    try:
        vocab = words(words_count)
        conn = await asyncpg.connect(url)
        try:
            await premigrate(conn)
            load_s = await bulk_load(conn, vocab, messages, rooms)
        finally:
            await conn.close()
        rows.append({"phase": "bulk load", "messages": messages, "seconds": round(load_s, 2)})

        store = PostgresStore(url, pool_max=4)
        await store.start()
        try:
            stop = asyncio.Event()
            writing = asyncio.create_task(poster(store, stop, rooms))
            t0 = time.perf_counter()
            applied = await store.migrate()
            migrate_s = time.perf_counter() - t0
            stop.set()
            during = await writing
            rows.append(
                {
                    "phase": "migration " + "+".join(applied),
                    "messages": messages,
                    "seconds": round(migrate_s, 2),
                    "posts_during": len(during),
                    "post_" + "max_ms": summary_ms(during)["max_ms"],
                    "post_p99_ms": summary_ms(during)["p99_ms"],
                }
            )
            async with store.pool.acquire() as c:
                await c.execute("ANALYZE messages")
            scopes = {
                "all rooms": RoomScope(everything=True),
                "10 rooms": RoomScope(
                    names=tuple(dict.fromkeys(f"room-{i * rooms // 10}" for i in range(10)))
                ),
            }
            for kind in ("one-word", "two-word", "phrase", "prefix"):
                qs = queries(vocab, kind, queries_each)
                for label, scope in scopes.items():
                    durations, found = [], 0
                    for q in qs:
                        query = parse_query(q)
                        t0 = time.perf_counter()
                        page = await store.search(query, scope, limit=20, timeout=10)
                        durations.append(time.perf_counter() - t0)
                        found += len(page.messages)
                    rows.append(
                        {
                            "phase": f"search {kind}",
                            "scope": label,
                            "queries": len(qs),
                            "mean_hits": round(found / len(qs), 1),
                            **summary_ms(durations),
                        }
                    )
            await posts_per_s(store, rooms, posts // 4, 16)  # warm: pool, plans, caches
            with_index = await posts_per_s(store, rooms, posts, 16)
            async with store.pool.acquire() as c:
                await c.execute("ALTER TABLE messages DISABLE TRIGGER messages_search")
                await c.execute("DROP INDEX messages_search")
            without = await posts_per_s(store, rooms, posts, 16)
            rows.append(
                {
                    "phase": "posts/s",
                    "with_search": with_index,
                    "without_search": without,
                    "cost_pct": round(100 * (1 - with_index / without), 1),
                }
            )
        finally:
            await store.close()
    finally:
        await drop_database(url)
    return rows
