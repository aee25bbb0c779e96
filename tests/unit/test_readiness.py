"""Readiness in process: probes that count their calls; what a scrape reuses and
what it asks again."""

from __future__ import annotations

import asyncio

from chat_gateway.ops.readiness import Readiness


async def test_a_scrape_reuses_a_recent_round_but_asks_closing_now() -> None:
    calls = 0
    closing = False
    told: list[bool] = []

    async def probe() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)

    readiness = Readiness({"database": probe}, lambda: closing, told=told.append, reuse=0.3)
    assert await asyncio.gather(*(readiness.recent() for _ in range(5))) == [True] * 5
    assert calls == 1, "the scrapes that found no round shared one"
    assert await readiness.recent() is True and calls == 1
    closing = True
    assert await readiness.recent() is False and calls == 1, "reused, closing asked now"
    assert told[-1] is False
    closing = False
    ok, checks = await readiness.check()
    assert ok and checks["database"]["ok"] and calls == 2
    await readiness.check()
    assert calls == 3, "/readyz probes every time"
    await asyncio.sleep(0.35)
    assert await readiness.recent() is True and calls == 4, "past the reuse: a new round"


async def test_a_failed_round_is_reused_as_failed() -> None:
    calls = 0

    async def probe() -> None:
        nonlocal calls
        calls += 1
        raise ConnectionError("refused")

    readiness = Readiness({"broker": probe}, lambda: False, reuse=5)
    ok, checks = await readiness.check()
    assert not ok and checks["broker"] == {
        "ok": False,
        "error": "refused",
        "latency_ms": checks["broker"]["latency_ms"],
    }
    assert await readiness.recent() is False and calls == 1
