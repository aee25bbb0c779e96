"""The webhook outbox on the embedded SQLite store: one instance, one connection.

Every call runs on the store's single database thread, so a claim and its lease
are one step nobody can interleave with; leases still expire, so the events a
killed process held are sent again after its restart.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from chat_gateway.storage.outbox import (
    DEAD,
    DELIVERED,
    SUBJECT_WAIT,
    Backlog,
    DeadLetter,
    Delivery,
    Endpoint,
    Outbox,
)

T = TypeVar("T")


class Database(Protocol):
    """What the outbox needs of the SQLite store: a call on its database thread."""

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, bounded: bool = True) -> T: ...


_DELIVERY = "id, endpoint_id, event_id, type, room, seq, data, created_ms, attempts"
# A subject's transition waits for its predecessor's row (storage.outbox); its rows
# have seq = pos. One parameter: the creation time (ms) before which it waits no more.
_IN_TURN = (
    "(o.room NOT LIKE '@%' OR o.pos <= 1 OR o.created_ms < ? "
    "OR EXISTS (SELECT 1 FROM webhook_outbox p WHERE p.room = o.room AND p.seq = o.pos - 1))"
)

_HEADS = (
    "SELECT endpoint_id, room, min(pos) AS pos FROM webhook_outbox WHERE state = 0 "
    "GROUP BY endpoint_id, room"
)


def _now() -> int:
    return int(time.time() * 1000)


def _delivery(r: Any) -> Delivery:
    return Delivery(*r)


def _endpoint(r: Any) -> Endpoint:
    return Endpoint(r[0], r[1], r[3] if r[2] is not None else None)


class SQLiteOutbox(Outbox):
    def __init__(self, store: Database) -> None:
        self.store = store

    async def _write(self, statement: str, args: tuple[Any, ...]) -> int:
        def run(db: sqlite3.Connection) -> int:
            return db.execute(statement, args).rowcount

        return await self.store._run(run)

    async def register(self, urls: list[str]) -> list[Endpoint]:
        def run(db: sqlite3.Connection) -> list[Endpoint]:
            db.executemany(
                "INSERT INTO webhook_endpoints (url) VALUES (?) ON CONFLICT (url) DO NOTHING",
                [(u,) for u in urls],
            )
            rows = db.execute(
                "SELECT id, url, disabled_ms, disabled_reason FROM webhook_endpoints"
            ).fetchall()
            by_url = {r[1]: _endpoint(r) for r in rows}
            return [by_url[u] for u in urls]

        return await self.store._run(run)

    async def endpoints(self) -> list[Endpoint]:
        def run(db: sqlite3.Connection) -> list[Endpoint]:
            return [
                _endpoint(r)
                for r in db.execute(
                    "SELECT id, url, disabled_ms, disabled_reason FROM webhook_endpoints "
                    "ORDER BY id"
                )
            ]

        return await self.store._run(run)

    async def disable(self, endpoint_id: int, reason: str) -> None:
        await self._write(
            "UPDATE webhook_endpoints SET disabled_ms = ?, disabled_reason = ? WHERE id = ?",
            (_now(), reason, endpoint_id),
        )

    async def enable(self, endpoint_id: int) -> None:
        await self._write(
            "UPDATE webhook_endpoints SET disabled_ms = NULL, disabled_reason = NULL WHERE id = ?",
            (endpoint_id,),
        )

    def _lease(
        self, db: sqlite3.Connection, ids: list[int], lease: float, now: int
    ) -> list[Delivery]:
        if not ids:
            return []
        marks = ",".join("?" * len(ids))
        db.execute(
            f"UPDATE webhook_outbox SET lease_ms = ? WHERE id IN ({marks})",
            (now + int(lease * 1000), *ids),
        )
        rows = db.execute(
            f"SELECT {_DELIVERY} FROM webhook_outbox WHERE id IN ({marks}) ORDER BY next_ms", ids
        ).fetchall()
        return [_delivery(r) for r in rows]

    async def enqueue(
        self,
        endpoint_ids: list[int],
        event_id: str,
        type_: str,
        queue: str,
        pos: int,
        data: str,
        ms: int,
    ) -> None:
        if not endpoint_ids:
            return

        def run(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT INTO webhook_outbox (endpoint_id, event_id, type, room, seq, "
                "pos, data, created_ms, next_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(e, event_id, type_, queue, pos, pos, data, ms, ms) for e in endpoint_ids],
            )

        await self.store._run(run)

    async def claim(self, endpoint_ids: list[int], limit: int, lease: float) -> list[Delivery]:
        if not endpoint_ids or limit < 1:
            return []

        def run(db: sqlite3.Connection) -> list[Delivery]:
            now = _now()
            marks = ",".join("?" * len(endpoint_ids))
            ids = [
                r[0]
                for r in db.execute(
                    f"SELECT o.id FROM webhook_outbox o JOIN ({_HEADS}) h "
                    "ON o.endpoint_id = h.endpoint_id AND o.room = h.room AND o.pos = h.pos "
                    f"WHERE o.endpoint_id IN ({marks}) AND o.state = 0 AND o.next_ms <= ? "
                    f"AND (o.lease_ms IS NULL OR o.lease_ms < ?) AND {_IN_TURN} "
                    "ORDER BY o.next_ms LIMIT ?",
                    (*endpoint_ids, now, now, now - int(SUBJECT_WAIT * 1000), limit),
                )
            ]
            return self._lease(db, ids, lease, now)

        return await self.store._run(run)

    async def delivered(
        self, delivery: Delivery, status: int, *, lease: float, chain: bool
    ) -> Delivery | None:
        def run(db: sqlite3.Connection) -> Delivery | None:
            now = _now()
            db.execute(
                "UPDATE webhook_outbox SET state = ?, attempts = attempts + 1, "
                "finished_ms = ?, lease_ms = NULL, last_status = ?, last_error = NULL "
                "WHERE id = ?",
                (DELIVERED, now, status, delivery.id),
            )
            if not chain:
                return None
            row = db.execute(
                f"SELECT o.id, o.next_ms, o.lease_ms, {_IN_TURN} FROM webhook_outbox o "
                "WHERE o.state = 0 AND o.endpoint_id = ? AND o.room = ? "
                "ORDER BY o.pos LIMIT 1",
                (now - int(SUBJECT_WAIT * 1000), delivery.endpoint_id, delivery.room),
            ).fetchone()
            if row is None or row[1] > now or (row[2] is not None and row[2] >= now) or not row[3]:
                return None
            return self._lease(db, [row[0]], lease, now)[0]

        return await self.store._run(run)

    async def retry(self, delivery: Delivery, delay: float, status: int | None, error: str) -> None:
        await self._write(
            "UPDATE webhook_outbox SET attempts = attempts + 1, lease_ms = NULL, "
            "next_ms = ?, last_status = ?, last_error = ? WHERE id = ?",
            (_now() + int(delay * 1000), status, error[:500], delivery.id),
        )

    async def dead(self, delivery: Delivery, status: int | None, error: str) -> None:
        await self._write(
            "UPDATE webhook_outbox SET state = ?, attempts = attempts + 1, "
            "finished_ms = ?, lease_ms = NULL, last_status = ?, last_error = ? "
            "WHERE id = ?",
            (DEAD, _now(), status, error[:500], delivery.id),
        )

    async def renew(self, ids: list[int], lease: float) -> None:
        if ids:
            marks = ",".join("?" * len(ids))
            await self._write(
                "UPDATE webhook_outbox SET lease_ms = ? "
                f"WHERE id IN ({marks}) AND state = 0 AND lease_ms IS NOT NULL",
                (_now() + int(lease * 1000), *ids),
            )

    async def release(self, delivery: Delivery) -> None:
        await self._write("UPDATE webhook_outbox SET lease_ms = NULL WHERE id = ?", (delivery.id,))

    async def backlog(self) -> list[Backlog]:
        def run(db: sqlite3.Connection) -> list[Backlog]:
            return [
                Backlog(*r)
                for r in db.execute(
                    "SELECT endpoint_id, count(*), min(created_ms) FROM webhook_outbox "
                    "WHERE state = 0 GROUP BY endpoint_id"
                )
            ]

        return await self.store._run(run)

    async def dead_letters(
        self, *, limit: int, before: int | None = None, endpoint_id: int | None = None
    ) -> list[DeadLetter]:
        def run(db: sqlite3.Connection) -> list[DeadLetter]:
            return [
                DeadLetter(*r)
                for r in db.execute(
                    f"SELECT {_DELIVERY}, last_status, last_error, finished_ms FROM webhook_outbox "
                    "WHERE state = 2 AND (? IS NULL OR id < ?) AND (? IS NULL OR endpoint_id = ?) "
                    "ORDER BY id DESC LIMIT ?",
                    (before, before, endpoint_id, endpoint_id, limit),
                )
            ]

        return await self.store._run(run)

    async def replay(
        self,
        *,
        ids: list[int] | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        endpoint_id: int | None = None,
    ) -> int:
        reset = (
            "UPDATE webhook_outbox SET state = 0, attempts = 0, next_ms = ?, "
            "lease_ms = NULL, finished_ms = NULL, last_error = NULL "
        )
        now = _now()
        if ids is not None:
            marks = ",".join("?" * len(ids)) or "NULL"
            return await self._write(
                reset + f"WHERE id IN ({marks}) AND state = 2 AND (? IS NULL OR endpoint_id = ?)",
                (now, *ids, endpoint_id, endpoint_id),
            )
        return await self._write(
            reset + f"WHERE created_ms >= ? AND created_ms < ? AND state IN ({DELIVERED}, {DEAD}) "
            "AND (? IS NULL OR endpoint_id = ?)",
            (
                now,
                since_ms or 0,
                until_ms if until_ms is not None else 2**62,
                endpoint_id,
                endpoint_id,
            ),
        )

    async def prune(self, cutoff_ms: int, limit: int) -> int:
        return await self._write(
            "DELETE FROM webhook_outbox WHERE id IN (SELECT id FROM webhook_outbox o "
            f"WHERE created_ms < ? AND state = {DELIVERED} "
            # a subject queue row stays until its successor is written (which waits for it)
            "AND (o.room NOT LIKE '@%' OR EXISTS (SELECT 1 FROM webhook_outbox n "
            "WHERE n.room = o.room AND n.seq = o.seq + 1)) LIMIT ?)",
            (cutoff_ms, limit),
        )
