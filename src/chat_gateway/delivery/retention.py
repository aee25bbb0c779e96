"""Retention: delete messages older than ``RETENTION_DAYS``, in small batches.

Each round deletes batches of ``RETENTION_BATCH`` rows (each its own short
transaction, so writers are never blocked for long and the table is never
locked) until a batch comes back short, pausing briefly between batches. Every
instance runs it; on Postgres the batches skip rows another instance holds.
The history cache's pages of every room a batch deleted from are voided on
every instance (``HistoryCache.changed``), so no cached page serves a deleted
message.

The same rounds purge state rooms' tombstones older than ``STATE_TOMBSTONE_TTL``
(``Store.purge_tombstones``), whether or not ``RETENTION_DAYS`` is set.
"""

from __future__ import annotations

import asyncio
import logging
import time

from chat_gateway.periodic import every
from chat_gateway.storage import Store
from chat_gateway.storage.cache import HistoryCache

log = logging.getLogger("gateway.retention")


class Retention:
    def __init__(
        self,
        store: Store,
        *,
        history: HistoryCache | None = None,
        days: float | None,
        interval: float = 3600.0,
        batch: int = 1000,
        pause: float = 0.05,
        tombstone_ttl: float | None = None,
    ) -> None:
        self.store = store
        self.history = history if history is not None else HistoryCache(store)
        self.days = days  # None: messages are kept
        self.tombstone_ttl = tombstone_ttl  # seconds; None: tombstones are kept
        self.interval = interval
        self.batch = batch
        self.pause = pause
        self._task: asyncio.Task[None] | None = None

    async def run_once(self, now_ms: int | None = None) -> int:
        """Delete everything past the retention age; return how many messages went."""
        now_ms = int(time.time() * 1000) if now_ms is None else now_ms
        if self.tombstone_ttl is not None:
            await self.purge_tombstones(now_ms - int(self.tombstone_ttl * 1000))
        if self.days is None:
            return 0
        cutoff = now_ms - int(self.days * 86_400_000)
        total = 0
        while True:
            rooms: set[str] = set()
            deleted = await self.store.delete_before(cutoff, self.batch, rooms)
            for room in rooms:
                await self.history.changed(room)
            total += deleted
            if deleted < self.batch:
                break
            await asyncio.sleep(self.pause)
        if total:
            log.info(
                "retention deleted messages", extra={"deleted": total, "older_than_days": self.days}
            )
        return total

    async def purge_tombstones(self, cutoff_ms: int) -> int:
        """Purge state rooms' tombstones written before ``cutoff_ms``; return how many."""
        total = 0
        while True:
            purged = await self.store.purge_tombstones(cutoff_ms, self.batch)
            total += purged
            if purged < self.batch:
                break
            await asyncio.sleep(self.pause)
        if total:
            log.info("retention purged state tombstones", extra={"purged": total})
        return total

    def start(self) -> None:
        self._task = every(self.interval, self.run_once, "retention round", now=True)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
