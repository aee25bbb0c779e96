"""The presence refresh against a redis-server of the test's own: it pushes this
instance's expiries forward and sweeps expired members, and costs no script call
(and no round trip of its own) for a held room where nobody has a presence name."""

from __future__ import annotations

import asyncio
import time

from chat_gateway.delivery.presence import RedisPresence
from chat_gateway.pubsub.redis import RedisBroker
from tests.harness import RedisServer, eventually


async def test_refresh_runs_scripts_only_where_members_expired():
    rs = RedisServer()
    rs.start()
    broker = RedisBroker(rs.url, control_channel="t:control")
    try:
        await broker.start()
        await asyncio.wait_for(broker.connected.wait(), 10)
        redis = broker.context.client
        idle = [f"idle{i}" for i in range(1200)]
        held = [*idle, "crash", "here"]
        presence = RedisPresence(
            broker,
            broker.context,
            prefix="t:",
            ttl=30.0,
            channel=lambda room: f"t:room:{{{room}}}",
            held_rooms=lambda: held,
            instance="this",
        )
        announced: list[bytes] = []
        broker.on_message(lambda channel, data: announced.append(data))
        await broker.subscribe("t:room:{crash}")
        # A member of an instance that crashed, expired a second ago, and one of this
        # instance's own, whose expiry is near.
        now_ms = int(time.time() * 1000)
        await redis.zadd(
            "t:{crash}:presence", {"gone:zoe": now_ms - 1000, "other:yan": now_ms + 60_000}
        )
        await presence.joined(1, "ana", "here")
        await redis.zadd("t:{here}:presence", {"this:ana": now_ms + 1000})
        await redis.config_resetstat()

        await presence.refresh()

        stats = await redis.info("commandstats")
        # Script runs: a NOSCRIPT reply (a fresh server) fails and runs nothing.
        scripts = sum(
            stats.get(name, {}).get("calls", 0) - stats.get(name, {}).get("failed_calls", 0)
            for name in ("cmdstat_evalsha", "cmdstat_eval")
        )
        assert scripts == 1, f"one sweep (the room with an expired member), got {scripts}"
        assert await redis.zscore("t:{crash}:presence", "gone:zoe") is None
        assert await redis.zscore("t:{crash}:presence", "other:yan") is not None
        assert await redis.zscore("t:{here}:presence", "this:ana") > now_ms + 20_000
        await eventually(lambda: any(b'"leave"' in d and b'"zoe"' in d for d in announced))
        assert not any(b'"yan"' in d for d in announced)
        assert not any(f"idle{i}".encode() in d for d in announced for i in range(3))
    finally:
        await broker.close()
        rs.stop()
