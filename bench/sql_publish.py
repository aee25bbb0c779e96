"""Posting from SQL: latency from a backend's COMMIT to a subscriber elsewhere.

Two gateway instances on one Postgres database. A backend connection in this
process calls ``chat_post`` in a transaction of its own and commits, ``posts``
times, ``pace`` seconds apart (an idle machine otherwise); a WebSocket
subscriber on the second instance, which the backend never talks to, reads each
message. The figure is the time from COMMIT returning to the frame read: the
LISTEN wake-up, the fill from the store and the delivery (docs/backends.md).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import orjson

from bench.stats import summary_ms
from bench.targets import Gateway
from bench.wsclient import WSClient

ROOM = "sql-bench"


async def run(*, posts: int = 300, pace: float = 0.01) -> list[dict[str, Any]]:
    target = Gateway()
    try:
        # No position check during the run: only the wake-up delivers.
        _, far = await target.start(2, {"POSITION_INTERVAL": "600"})
        assert target.database_url is not None
        arrived: asyncio.Queue[float] = asyncio.Queue()
        subscribed = asyncio.get_running_loop().create_future()

        def on_frame(_client: WSClient, data: bytes) -> None:
            kind = orjson.loads(data).get("type")
            if kind == "message":
                arrived.put_nowait(time.perf_counter())
            elif kind == "subscribed" and not subscribed.done():
                subscribed.set_result(None)

        ws = await WSClient.connect("127.0.0.1", far.port, target.ws_path(ROOM), on_frame)
        ws.send_text(orjson.dumps({"type": "subscribe", "room": ROOM, "since": 0}))
        await asyncio.wait_for(subscribed, 30)
        db = await asyncpg.connect(target.database_url)
        latencies: list[float] = []
        try:
            for i in range(posts):
                async with db.transaction():
                    await db.fetchval("SELECT chat_post($1, 'backend', $2)", ROOM, f"m{i}")
                committed = time.perf_counter()
                latencies.append(await asyncio.wait_for(arrived.get(), 30) - committed)
                await asyncio.sleep(pace)
        finally:
            await db.close()
            if ws.transport is not None:
                ws.transport.close()
        return [{"posts": posts, "pace_ms": pace * 1000, **summary_ms(latencies)}]
    finally:
        await target.stop()
