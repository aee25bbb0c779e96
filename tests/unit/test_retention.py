"""Retention (chat_gateway.delivery.retention) on the embedded SQLite store, and run by
a gateway in this process: old messages go in batches, seqs are never reused."""

from __future__ import annotations

import sqlite3

import asyncpg
import orjson

from chat_gateway.access.auth import Identity
from chat_gateway.config import Settings
from chat_gateway.delivery.hub import WS, Subscriber
from chat_gateway.delivery.retention import Retention
from chat_gateway.gateway import Gateway
from chat_gateway.storage import create_store
from tests.harness import eventually

DAY_MS = 86_400_000


async def age(url: str, room: str, seqs: range, days: int) -> None:
    """Move the commit time of some messages ``days`` into the past."""
    if url.startswith("sqlite"):
        db = sqlite3.connect(url[len("sqlite:///") :])
        db.execute(
            f"UPDATE messages SET created_ms = created_ms - {days * DAY_MS} "
            f"WHERE room = ? AND seq BETWEEN ? AND ?",
            (room, seqs[0], seqs[-1]),
        )
        db.commit()
        db.close()
        return
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            f"UPDATE messages SET created_at = created_at - interval '{days} days' "
            "WHERE room = $1 AND seq BETWEEN $2 AND $3",
            room,
            seqs[0],
            seqs[-1],
        )
    finally:
        await conn.close()


async def test_sqlite_deletes_old_messages_in_batches(tmp_path):
    await old_messages_go_in_batches_and_seqs_are_never_reused(f"sqlite:///{tmp_path}/r.db")


async def old_messages_go_in_batches_and_seqs_are_never_reused(store_url: str) -> None:
    store = create_store(store_url)
    await store.start()
    try:
        await store.migrate()
        for i in range(10):
            await store.append("old", "ana", f"m{i}")
        await store.append("other", "bob", "recent")
        await age(store_url, "old", range(1, 8), days=10)

        assert await store.delete_before(4_000_000_000_000, 0) == 0  # a batch of none
        retention = Retention(store, days=7, batch=3, pause=0)
        assert await retention.run_once() == 7
        page = await store.history("old", limit=50)
        assert [m.seq for m in page.messages] == [8, 9, 10]
        assert (await store.history("other")).messages[0].text == "recent"
        assert await retention.run_once() == 0
        msg, _ = await store.append("old", "ana", "after")
        assert msg.seq == 11, "a deleted seq is never handed out again"
    finally:
        await store.close()


async def test_the_gateway_runs_retention_when_configured(tmp_path):
    url = f"sqlite:///{tmp_path}/g.db"
    settings = Settings.from_env({}, database_url=url, redis_url="memory://")
    gw = Gateway(settings)
    await gw.start()
    for i in range(4):
        await gw.services.publisher.post(
            "r", "ana", f"m{i}", identity=Identity("ana"), transport="http"
        )
    await gw.close()
    await age(url, "r", range(1, 3), days=3)

    gw = Gateway(settings.with_(retention_days=2.0, retention_batch=1))
    await gw.start()
    try:

        async def remaining() -> list[int]:
            return [m.seq for m in (await gw.store.history("r")).messages]

        assert await eventually(lambda: _equals(remaining, [3, 4]))
        # a resume from before the retention horizon gets what is left, then live
        sub = Subscriber(WS)
        gw.hub.register(sub)
        await gw.hub.subscribe(sub, "r", since=0)
        await eventually(lambda: sub.position("r") == 4)
        await gw.services.publisher.post(
            "r", "ana", "live", identity=Identity("ana"), transport="http"
        )
        await eventually(lambda: sub.position("r") == 5)
        frames = [orjson.loads(f) for f in sub._queue]
        assert [f["message"]["seq"] for f in frames if f["type"] == "message"] == [3, 4, 5]
    finally:
        await gw.close()


async def _equals(fn, expected) -> bool:
    return await fn() == expected
