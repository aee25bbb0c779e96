"""Wake-ups for messages a backend posted with SQL (``chat_post``, migration 0012).

``chat_post`` calls ``pg_notify(POSTED_CHANNEL, '{"room": …, "seq": …}')`` inside the
backend's transaction: Postgres delivers it at COMMIT and never after a ROLLBACK.
``Listener`` keeps one connection of its own outside the pool (LISTEN holds its
session) and hands each notification's room and seq to a callback; a lost
connection is made again after ``RETRY`` seconds, and a silent one is probed every
``PROBE`` seconds. A notification lost meanwhile costs latency only: the hub's
periodic position check reads the store and fills the room.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson

log = logging.getLogger("storage.postgres")

POSTED_CHANNEL = "chat_gateway_posted"
# The listening session's application_name (pg_stat_activity shows it).
APPLICATION_NAME = "chat-gateway listen"
RETRY = 1.0
PROBE = 10.0

Posted = Callable[[str, int], None]


class Listener:
    def __init__(self, url: str, on_posted: Posted, *, timeout: float) -> None:
        self.url = url
        self.on_posted = on_posted
        self.timeout = timeout
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep(), name="postgres listen")

    async def close(self) -> None:
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _received(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            data = orjson.loads(payload)
            room, seq = data["room"], data["seq"]
            if not isinstance(room, str) or not isinstance(seq, int):
                raise TypeError("room must be a string, seq an integer")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed %s notification: %s", channel, exc)
            return
        self.on_posted(room, seq)

    async def _keep(self) -> None:
        while True:
            try:
                await self._listen()
            except Exception as exc:  # whatever ends a session, listen again
                # A session cut while it starts can end in any of asyncpg's errors, an
                # OSError or an EOF; the notifications only save latency, so the loop
                # must outlive every one of them.
                log.warning(
                    "LISTEN %s failed, again in %ss: %s: %s",
                    POSTED_CHANNEL,
                    RETRY,
                    type(exc).__name__,
                    exc,
                )
            await asyncio.sleep(RETRY)

    async def _listen(self) -> None:
        """One listening session, until it is lost."""
        conn = await asyncpg.connect(
            self.url,
            timeout=self.timeout,
            server_settings={"application_name": APPLICATION_NAME},
        )
        lost = asyncio.Event()
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(POSTED_CHANNEL, self._received)
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), PROBE)
                if not lost.is_set():
                    await asyncio.wait_for(conn.fetchval("SELECT 1"), self.timeout)
            log.warning("LISTEN %s connection lost, again in %ss", POSTED_CHANNEL, RETRY)
        finally:
            conn.terminate()
