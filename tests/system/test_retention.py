"""Retention on Postgres: the run tests/unit/test_retention.py makes on SQLite, on a
throwaway Postgres database."""

from __future__ import annotations

from tests.unit.test_retention import old_messages_go_in_batches_and_seqs_are_never_reused


async def test_postgres_deletes_old_messages_in_batches(pg_url):
    await old_messages_go_in_batches_and_seqs_are_never_reused(pg_url)
