"""Background jobs that repeat: position checks, presence refresh, retention."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("gateway.periodic")


def every(
    interval: float, job: Callable[[], Awaitable[object]], name: str, *, now: bool = False
) -> asyncio.Task[None]:
    """Run ``job`` every ``interval`` seconds (first at once if ``now``) until the task
    is cancelled. A failed round is logged and the next one tries again."""

    async def loop() -> None:
        if not now:
            await asyncio.sleep(interval)
        while True:
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("%s failed: %r", name, exc)
            await asyncio.sleep(interval)

    return asyncio.create_task(loop(), name=name)
