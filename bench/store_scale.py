"""What one Postgres does as rooms and rows grow, measured on a throwaway database.

1. Appends/s with CONCURRENCY writers, all in one room and spread over ROOMS
   rooms: a room's writers queue on its seq row lock, different rooms do not.
2. Latency of the latest-page history read (the cache-miss path) and of a
   read deep in the past, with the messages table at SMALL and then LARGE rows
   (bulk-loaded over ROOMS rooms): the (room, seq) index keeps both flat.

    python -m bench.store_scale [--large 1000000] [--concurrency 16]

Uses the machine's Postgres (TEST_PG_ADMIN_URL); the database is dropped after.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import asyncpg

from chat_gateway.storage.postgres import PostgresStore
from tests.harness import create_database, drop_database


async def appends(
    store: PostgresStore, rooms: int, total: int, concurrency: int, tag: str
) -> float:
    async def writer(k: int) -> None:
        for n in range(k, total, concurrency):
            await store.append(f"{tag}-{n % rooms}", "bench", "x" * 100)

    t0 = time.perf_counter()
    await asyncio.gather(*(writer(k) for k in range(concurrency)))
    return total / (time.perf_counter() - t0)


async def read_ms(store: PostgresStore, rooms: int, **kwargs: int) -> float:
    samples = []
    for i in range(200):
        t0 = time.perf_counter()
        await store.history(f"bulk-{(i * 7919) % rooms}", limit=50, **kwargs)
        samples.append((time.perf_counter() - t0) * 1000)
    return statistics.median(samples)


async def bulk_load(url: str, start: int, end: int, rooms: int) -> None:
    """Rows ``start``..``end - 1``, row g in room ``bulk-{g % rooms}`` with seq ``g // rooms + 1``."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "INSERT INTO messages (room, seq, id, author, text, created_at) "
            "SELECT 'bulk-' || (g % $3), g / $3 + 1, 'b' || g, 'bench', repeat('x', 100), now() "
            "FROM generate_series($1, $2 - 1) g",
            start,
            end,
            rooms,
        )
        await conn.execute(
            "INSERT INTO rooms (room, last_seq) SELECT 'bulk-' || r, ($1 - 1) / $2 + 1 "
            "FROM generate_series(0, $2 - 1) r ON CONFLICT (room) DO UPDATE "
            "SET last_seq = EXCLUDED.last_seq",
            end,
            rooms,
        )
        await conn.execute("ANALYZE messages")
    finally:
        await conn.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rooms", type=int, default=1000)
    ap.add_argument("--appends", type=int, default=4000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--large", type=int, default=1_000_000)
    args = ap.parse_args()
    url = await create_database()
    store = PostgresStore(url, pool_min=args.concurrency, pool_max=args.concurrency)
    try:
        await store.start()
        await store.migrate()
        one = await appends(store, 1, args.appends, args.concurrency, "one")
        many = await appends(store, args.rooms, args.appends, args.concurrency, "many")
        print(f"appends/s, {args.concurrency} writers, one room:   {one:8.0f}")
        print(f"appends/s, {args.concurrency} writers, {args.rooms} rooms: {many:8.0f}")
        loaded = 0
        for size in (args.small, args.large):
            await bulk_load(url, loaded, size, args.rooms)
            loaded = size
            latest = await read_ms(store, args.rooms)
            deep = await read_ms(store, args.rooms, before=5)
            print(
                f"{size:>9} rows: latest page {latest:.2f} ms, oldest page {deep:.2f} ms "
                "(median of 200)"
            )
    finally:
        await store.close()
        await drop_database(url)


if __name__ == "__main__":
    asyncio.run(main())
