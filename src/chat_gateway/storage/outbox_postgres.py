"""The webhook outbox on Postgres, through the store's pool.

A claim finds the head of every queue with a loose index scan (one index probe
per queue on ``webhook_outbox_pending``, not a read of every pending row), then
locks the due, unleased heads with ``FOR UPDATE SKIP LOCKED`` and leases them in
the same statement: two instances claiming at once never get the same row, and
a head another instance holds keeps its whole queue waiting.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

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


class Pool(Protocol):
    """What the outbox needs of the Postgres store: one call on its pool."""

    async def _call(self, method: str, query: str, *args: Any) -> Any: ...


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_FAR_MS = 32_503_680_000_000  # the year 3000: "no upper bound"
_MS = "(extract(epoch from {0}) * 1000)::bigint"
_DELIVERY = (
    "o.id, o.endpoint_id, o.event_id, o.type, o.room, o.seq, o.data, "
    f"{_MS.format('o.created_at')} AS created_ms, o.attempts"
)
_DUE = (
    "o.state = 0 AND o.next_at <= now() AND (o.lease_until IS NULL OR o.lease_until < now()) "
    # A subject's transition waits for its predecessor's row (storage.outbox); its
    # rows have seq = pos, found on webhook_outbox_message (room, seq).
    "AND (o.room NOT LIKE '@%' OR o.pos <= 1 "
    f"OR o.created_at < now() - interval '{SUBJECT_WAIT} seconds' "
    "OR EXISTS (SELECT 1 FROM webhook_outbox p WHERE p.room = o.room AND p.seq = o.pos - 1))"
)

_CLAIM = f"""
WITH RECURSIVE heads AS (
    (SELECT id, endpoint_id, room FROM webhook_outbox
     WHERE state = 0 ORDER BY endpoint_id, room, pos LIMIT 1)
    UNION ALL
    SELECT n.id, n.endpoint_id, n.room FROM heads h, LATERAL (
        SELECT id, endpoint_id, room FROM webhook_outbox o
        WHERE o.state = 0 AND (o.endpoint_id, o.room) > (h.endpoint_id, h.room)
        ORDER BY o.endpoint_id, o.room, o.pos LIMIT 1) n
), claimed AS (
    SELECT o.id FROM webhook_outbox o JOIN heads h ON h.id = o.id
    WHERE h.endpoint_id = ANY($1::bigint[]) AND {_DUE}
    ORDER BY o.next_at LIMIT $2
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE webhook_outbox o SET lease_until = now() + $3 * interval '1 second'
FROM claimed WHERE o.id = claimed.id
RETURNING {_DELIVERY}
"""

# Delivered, and the queue's next head leased, in one statement (one round trip).
# The statement sees the table as it was before it, so the row it marks is
# still pending there: the head is looked for among the other rows.
_DELIVERED_NEXT = f"""
WITH done AS (
    UPDATE webhook_outbox SET state = 1, attempts = attempts + 1, finished_at = now(),
        lease_until = NULL, last_status = $4, last_error = NULL
    WHERE id = $3
), head AS (
    SELECT id FROM webhook_outbox
    WHERE state = 0 AND endpoint_id = $1 AND room = $2 AND id <> $3 ORDER BY pos LIMIT 1
), claimed AS (
    SELECT o.id FROM webhook_outbox o JOIN head ON head.id = o.id WHERE {_DUE}
    FOR UPDATE OF o SKIP LOCKED
)
UPDATE webhook_outbox o SET lease_until = now() + $5 * interval '1 second'
FROM claimed WHERE o.id = claimed.id
RETURNING {_DELIVERY}
"""

_FINISH = """
UPDATE webhook_outbox SET state = $2, attempts = attempts + 1, finished_at = now(),
    lease_until = NULL, last_status = $3, last_error = $4
WHERE id = $1
"""

_RETRY = """
UPDATE webhook_outbox SET attempts = attempts + 1, lease_until = NULL,
    next_at = now() + $2 * interval '1 second', last_status = $3, last_error = $4
WHERE id = $1
"""


def _ts(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def _delivery(r: Any) -> Delivery:
    """A row of ``_DELIVERY``'s columns, in its order."""
    return Delivery(*r)


def _endpoint(r: Any) -> Endpoint:
    return Endpoint(r["id"], r["url"], r["disabled_reason"] if r["disabled_at"] else None)


class PostgresOutbox(Outbox):
    def __init__(self, store: Pool) -> None:
        self.store = store

    async def register(self, urls: list[str]) -> list[Endpoint]:
        # The list is marked in use, every other URL not: chat_post (migration 0012)
        # writes outbox rows for the receivers in use, as write_outbox does here.
        rows = await self.store._call(
            "fetch",
            "WITH given AS (INSERT INTO webhook_endpoints (url, in_use) "
            "SELECT unnest($1::text[]), true "
            "ON CONFLICT (url) DO UPDATE SET url = EXCLUDED.url, in_use = true "
            "RETURNING id, url, disabled_at, disabled_reason), "
            "others AS (UPDATE webhook_endpoints SET in_use = false "
            "WHERE in_use AND NOT url = ANY($1::text[])) "
            "SELECT * FROM given",
            urls,
        )
        by_url = {r["url"]: _endpoint(r) for r in rows}
        return [by_url[u] for u in urls]

    async def endpoints(self) -> list[Endpoint]:
        rows = await self.store._call(
            "fetch",
            "SELECT id, url, disabled_at, disabled_reason FROM webhook_endpoints ORDER BY id",
        )
        return [_endpoint(r) for r in rows]

    async def disable(self, endpoint_id: int, reason: str) -> None:
        await self.store._call(
            "execute",
            "UPDATE webhook_endpoints SET disabled_at = now(), disabled_reason = $2 WHERE id = $1",
            endpoint_id,
            reason,
        )

    async def enable(self, endpoint_id: int) -> None:
        await self.store._call(
            "execute",
            "UPDATE webhook_endpoints SET disabled_at = NULL, disabled_reason = NULL WHERE id = $1",
            endpoint_id,
        )

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
        await self.store._call(
            "execute",
            "INSERT INTO webhook_outbox (endpoint_id, event_id, type, room, seq, pos, data, "
            "created_at, next_at) SELECT e, $1, $2, $3, $4, $4, $5, $6, $6 "
            "FROM unnest($7::bigint[]) AS e",
            event_id,
            type_,
            queue,
            pos,
            data,
            _ts(ms),
            endpoint_ids,
        )

    async def claim(self, endpoint_ids: list[int], limit: int, lease: float) -> list[Delivery]:
        if not endpoint_ids or limit < 1:
            return []
        rows = await self.store._call("fetch", _CLAIM, endpoint_ids, limit, lease)
        return [_delivery(r) for r in rows]

    async def delivered(
        self, delivery: Delivery, status: int, *, lease: float, chain: bool
    ) -> Delivery | None:
        if not chain:
            await self.store._call("execute", _FINISH, delivery.id, DELIVERED, status, None)
            return None
        row = await self.store._call(
            "fetchrow",
            _DELIVERED_NEXT,
            delivery.endpoint_id,
            delivery.room,
            delivery.id,
            status,
            lease,
        )
        return None if row is None else _delivery(row)

    async def retry(self, delivery: Delivery, delay: float, status: int | None, error: str) -> None:
        await self.store._call("execute", _RETRY, delivery.id, delay, status, error[:500])

    async def dead(self, delivery: Delivery, status: int | None, error: str) -> None:
        await self.store._call("execute", _FINISH, delivery.id, DEAD, status, error[:500])

    async def renew(self, ids: list[int], lease: float) -> None:
        if ids:
            await self.store._call(
                "execute",
                "UPDATE webhook_outbox SET lease_until = now() + $2 * interval '1 second' "
                "WHERE id = ANY($1::bigint[]) AND state = 0 AND lease_until IS NOT NULL",
                ids,
                lease,
            )

    async def release(self, delivery: Delivery) -> None:
        await self.store._call(
            "execute", "UPDATE webhook_outbox SET lease_until = NULL WHERE id = $1", delivery.id
        )

    async def backlog(self) -> list[Backlog]:
        rows = await self.store._call(
            "fetch",
            f"SELECT endpoint_id, count(*) AS n, {_MS.format('min(created_at)')} "
            "AS oldest FROM webhook_outbox WHERE state = 0 GROUP BY endpoint_id",
        )
        return [Backlog(r["endpoint_id"], r["n"], r["oldest"]) for r in rows]

    async def dead_letters(
        self, *, limit: int, before: int | None = None, endpoint_id: int | None = None
    ) -> list[DeadLetter]:
        rows = await self.store._call(
            "fetch",
            f"SELECT {_DELIVERY}, o.last_status, o.last_error, "
            f"{_MS.format('o.finished_at')} AS dead_ms FROM webhook_outbox o "
            "WHERE o.state = 2 AND ($1::bigint IS NULL OR o.id < $1) "
            "AND ($2::bigint IS NULL OR o.endpoint_id = $2) ORDER BY o.id DESC LIMIT $3",
            before,
            endpoint_id,
            limit,
        )
        # _DELIVERY's columns, then the three of a dead letter, in DeadLetter's order
        return [DeadLetter(*r) for r in rows]

    async def replay(
        self,
        *,
        ids: list[int] | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        endpoint_id: int | None = None,
    ) -> int:
        reset = (
            "UPDATE webhook_outbox SET state = 0, attempts = 0, next_at = now(), "
            "lease_until = NULL, finished_at = NULL, last_error = NULL "
        )
        if ids is not None:
            status = await self.store._call(
                "execute",
                reset + "WHERE id = ANY($1::bigint[]) AND state = 2 "
                "AND ($2::bigint IS NULL OR endpoint_id = $2)",
                ids,
                endpoint_id,
            )
        else:
            status = await self.store._call(
                "execute",
                reset + "WHERE created_at >= $1 AND created_at < $2 "
                f"AND state IN ({DELIVERED}, {DEAD}) "
                "AND ($3::bigint IS NULL OR endpoint_id = $3)",
                _ts(since_ms or 0),
                _ts(until_ms if until_ms is not None else _FAR_MS),
                endpoint_id,
            )
        return int(status.split()[-1])

    async def prune(self, cutoff_ms: int, limit: int) -> int:
        status = await self.store._call(
            "execute",
            "DELETE FROM webhook_outbox WHERE id = ANY(ARRAY("
            f" SELECT id FROM webhook_outbox o WHERE created_at < $1 AND state = {DELIVERED}"
            # a subject queue row stays until its successor is written (which waits for it)
            " AND (o.room NOT LIKE '@%' OR EXISTS (SELECT 1 FROM webhook_outbox n"
            " WHERE n.room = o.room AND n.seq = o.seq + 1))"
            " LIMIT $2))",
            _ts(cutoff_ms),
            limit,
        )
        return int(status.split()[-1])


__all__ = ["PostgresOutbox"]
