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
4. Posts/s and the server's CPU per post with the search trigger and index, and
   on a copy of the database without both, in turns (medians of three each).
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from typing import Any

import asyncpg

from bench.procs import cpu_seconds
from bench.stats import summary_ms
from chat_gateway.storage import migrations
from chat_gateway.storage.postgres import PostgresStore
from chat_gateway.storage.search import RoomScope, parse_query
from tests.harness import create_database, drop_database

ROUNDS = 3  # turns of posts with and without search

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "do", "gu", "be", "fi"]


def words(n: int) -> list[str]:
    """``n`` distinct made-up words of two to four syllables."""
    rng = random.Random(7)
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))] = None
    return list(out)


async def premigrate(conn: asyncpg.Connection) -> None:
    """Every migration but search's, as the store would have applied them (those
    after it too: the store's statements read their columns)."""
    await conn.execute(
        "CREATE TABLE schema_migrations (version text PRIMARY KEY, "
        "applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for version, sql in migrations.load("postgres"):
        if version.startswith("0010"):
            continue
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


PLAIN = "_plain"  # the copy of the table without search


async def backends_cpu(store: PostgresStore) -> float:
    """CPU seconds so far of the store's server processes (its pooled connections)."""
    async with store.pool.acquire() as conn:
        pids = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend'"
        )
    return sum(cpu_seconds(r["pid"]) for r in pids)


async def indexing_cost(
    store: PostgresStore, url: str, rooms: int, posts: int, turns: int = ROUNDS
) -> dict[str, Any]:
    """Posts/s and the server's CPU per post, on the table with search and on a copy
    without it (trigger and index dropped), in turns so that both meet the same
    moments of a shared machine; medians of the turns. ``store`` is closed and
    reopened: a database with connections cannot be copied."""
    await store.close()
    name = url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(url.rsplit("/", 1)[0] + "/postgres")
    try:
        await admin.execute(f'CREATE DATABASE "{name}{PLAIN}" TEMPLATE "{name}" STRATEGY FILE_COPY')
    finally:
        await admin.close()
    plain = PostgresStore(url + PLAIN, pool_max=4)
    await plain.start()
    await store.start()
    try:
        async with plain.pool.acquire() as c:
            await c.execute("DROP TRIGGER messages_search ON messages")
            await c.execute("DROP INDEX messages_search")
        stores = {"with": store, "without": plain}
        rate: dict[str, list[float]] = {k: [] for k in stores}
        cpu: dict[str, list[float]] = {k: [] for k in stores}
        for s in stores.values():
            await posts_per_s(s, rooms, posts // 4, 16)  # warm: pool, plans, caches
        for _ in range(turns):
            for k, s in stores.items():
                before = await backends_cpu(s)
                rate[k].append(await posts_per_s(s, rooms, posts, 16))
                cpu[k].append(1e6 * (await backends_cpu(s) - before) / posts)
    finally:
        await plain.close()
    with_index, without = statistics.median(rate["with"]), statistics.median(rate["without"])
    return {
        "phase": "posts/s",
        "with_search": with_index,
        "without_search": without,
        "cost_pct": round(100 * (1 - with_index / without), 1),
        "server_us_per_post": (
            f"{statistics.median(cpu['with']):.0f} vs {statistics.median(cpu['without']):.0f}"
        ),
        "turns": {k: v for k, v in rate.items()},
    }


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
            rows.append(await indexing_cost(store, url, rooms, posts))
        finally:
            await store.close()
    finally:
        await drop_database(url)
        await drop_database(url + PLAIN)
    return rows
