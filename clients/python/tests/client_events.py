"""What the client's tests share: quick reconnection delays and a client's events
collected in the background."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from chat_gateway_client import Client

FAST = {"min_delay": 0.05, "max_delay": 0.4}  # reconnect quickly after a gateway goes


@contextlib.asynccontextmanager
async def watching(client: Client) -> AsyncIterator[list[Any]]:
    """Every event of the client, collected in the background."""
    seen: list[Any] = []
    started = asyncio.Event()

    async def watch() -> None:
        events = client.events()
        first = asyncio.ensure_future(events.__anext__())
        started.set()
        seen.append(await first)
        async for ev in events:
            seen.append(ev)

    task = asyncio.create_task(watch())
    await started.wait()
    await asyncio.sleep(0)
    try:
        yield seen
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
            await task
