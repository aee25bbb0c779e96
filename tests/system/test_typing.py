"""Typing indicators across real gateway processes."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import redis.asyncio as aioredis

from tests.harness import (
    RedisServer,
    SSEClient,
    WSClient,
    embedded_env,
    eventually,
    instances,
    post,
)


async def test_typing_reaches_the_others_on_every_instance_at_most_every_two_seconds(gateway_env):
    room = "chat.typing"
    # A bucket of two posts: typing must not take from it.
    env = {**gateway_env, "RATE_LIMIT": "2/60s"}
    async with instances(3, env) as gws, httpx.AsyncClient(timeout=10) as http:
        async with (
            WSClient.connect(gws[0].ws_url + "?user=ana") as ana,
            WSClient.connect(gws[0].ws_url + "?user=ana") as ana2,
            WSClient.connect(gws[1].ws_url + "?user=bo") as bo,
            WSClient.connect(gws[2].ws_url) as nameless,
            SSEClient.open(f"{gws[2].url}/v1/rooms/{room}/events?user=cy") as cy,
        ):
            for c in (ana, ana2, bo, nameless):
                await c.subscribe(room)
            readers = [asyncio.create_task(c.read_all()) for c in (ana2, bo)]
            await ana.send({"type": "typing", "room": "elsewhere"})
            refused = await ana.expect("error")
            assert refused["code"] == "invalid_request"
            await nameless.send({"type": "typing", "room": room})
            assert (await nameless.expect("error"))["field"] == "user"

            def typing(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
                return [f for f in frames if f.get("type") == "typing"]

            for _ in range(10):
                await ana.send({"type": "typing", "room": room})
            await ana.send({"type": "ping", "ref": "p"})
            await ana.expect("pong")
            await eventually(
                lambda: typing(bo.frames) and [e for e in cy.events if e.get("event") == "typing"]
            )
            await asyncio.sleep(0.5)  # the other nine were dropped, not late
            assert typing(bo.frames) == [{"type": "typing", "room": room, "user": "ana"}]
            assert [e["json"] for e in cy.events if e.get("event") == "typing"] == [
                {"type": "typing", "room": room, "user": "ana"}
            ]
            assert typing(ana.frames) == typing(ana2.frames) == [], "not echoed to the typist"
            await asyncio.sleep(2.1)
            await bo.send({"type": "typing", "room": room})
            await ana.send({"type": "typing", "room": room})
            await eventually(lambda: len(typing(bo.frames)) == 2)
            await eventually(lambda: [f["user"] for f in typing(ana2.frames)] == ["bo"])
            # Eleven typing frames and the post bucket is still full.
            for i in range(2):
                r = await post(http, gws[0].url, room, f"m{i}", author="ana")
                assert r.status_code == 201, r.text
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)


async def test_typing_frames_cost_redis_one_set_per_window(tmp_path):
    redis = RedisServer()
    redis.start()
    try:
        env = embedded_env(tmp_path, REDIS_URL=redis.url, KEY_PREFIX="typing:")
        async with (
            instances(1, env) as (gw,),
            WSClient.connect(gw.ws_url + "?user=ana") as ws,
        ):
            await ws.subscribe("typed")

            async def sets() -> int:
                async with aioredis.from_url(redis.url) as client:
                    stats = await client.info("commandstats")
                return int(stats.get("cmdstat_set", {}).get("calls", 0))

            before = await sets()
            for _ in range(50):
                await ws.send({"type": "typing", "room": "typed"})
            await ws.send({"type": "ping", "ref": "after"})
            await ws.expect("pong")
            assert await sets() - before <= 1
    finally:
        redis.stop()
