"""Retention on Postgres: the run tests/unit/test_retention.py makes on SQLite, on a
throwaway Postgres database."""

from __future__ import annotations

import asyncpg
import httpx

from tests.harness import eventually, instances, post
from tests.unit.test_retention import old_messages_go_in_batches_and_seqs_are_never_reused


async def test_postgres_deletes_old_messages_in_batches(pg_url):
    await old_messages_go_in_batches_and_seqs_are_never_reused(pg_url)


async def test_retention_voids_every_instances_cached_page_of_what_it_deleted(gateway_env, pg_url):
    """Two instances have read (and cached, in Redis and in memory) a room's page;
    retention then deletes its messages from the store. Neither instance serves
    them afterwards: the cached page of a room retention deleted from is void."""
    env = {**gateway_env, "RETENTION_DAYS": "0.00002", "RETENTION_INTERVAL": "1"}
    room = "kept.briefly"
    async with instances(2, env) as gws, httpx.AsyncClient(timeout=30) as http:
        for i in range(3):
            r = await post(http, gws[0].url, room, f"soon gone {i}")
            assert r.status_code == 201, r.text
        for gw in gws:
            page = (await http.get(f"{gw.url}/v1/rooms/{room}/messages")).json()
            assert [m["text"] for m in page["messages"]] == [f"soon gone {i}" for i in range(3)]
        db = await asyncpg.connect(pg_url)
        try:

            async def deleted() -> bool:
                n = await db.fetchval("SELECT count(*) FROM messages WHERE room = $1", room)
                return int(n) == 0

            await eventually(deleted, 20)
        finally:
            await db.close()
        for gw in gws:
            page = (await http.get(f"{gw.url}/v1/rooms/{room}/messages")).json()
            assert page["messages"] == [], gw.url
