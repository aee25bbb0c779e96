"""The pieces the Redis brokers and other Redis users share, in this process: the link
loop of the Redis brokers (chat_gateway.pubsub.link) against a redis-server of the test's own,
and the guard of a Redis user that has none (chat_gateway.redisio.guard.NO_GUARD)."""

from __future__ import annotations

import asyncio
import logging

import pytest
import redis.asyncio as aioredis

from chat_gateway.pubsub import BrokerUnavailable
from chat_gateway.pubsub.redis import RedisBroker
from chat_gateway.redisio.guard import NO_GUARD, RedisGuard
from chat_gateway.redisio.pipelined import PipelinedConnection, per_key
from tests.harness import RedisServer, eventually, t


async def arrives(broker: RedisBroker, got: list[tuple[str, bytes]], data: bytes) -> bool:
    """Publish ``data`` on the held channel; whether it has come back by now. (The
    link is up once its SUBSCRIBE is sent; a publish the server runs before it is
    not delivered, which is at most once, so the check publishes again.)"""
    if ("t:room:{a}", data) in got:
        return True
    await broker.publish("t:room:{a}", data)
    await asyncio.sleep(0.05)
    return ("t:room:{a}", data) in got


async def test_link_loop_waits_for_redis_then_holds_and_restores_the_channels(caplog):
    # Not started yet: nothing answers there. The port is below the ephemeral range
    # (harness.free_port), so the link, reconnecting meanwhile, is never handed it as
    # its own and cannot connect to itself (TCP simultaneous open) and take that for
    # the server coming back.
    rs = RedisServer()
    broker = RedisBroker(
        rs.url,
        probe_interval=0.5,
        connect_timeout=0.2,
        command_timeout=0.5,
        control_channel="t:control",
    )
    got: list[tuple[str, bytes]] = []
    told: list[int] = []
    broker.on_message(lambda channel, data: got.append((channel, data)))
    broker.on_reconnect(lambda: told.append(broker.reconnects))
    caplog.set_level(logging.WARNING, logger="pubsub.redis")
    try:
        await broker.start()  # no failure with Redis down
        await broker.subscribe("t:room:{a}")  # recorded; the link subscribes it
        await asyncio.sleep(t(0.8))  # several attempts, backing off
        with pytest.raises(BrokerUnavailable):
            await broker.ping()
        assert not broker.connected.is_set() and told == []

        rs.start()
        await asyncio.wait_for(broker.connected.wait(), t(10))
        # The first link, with a room held from before it: the caller is told (to
        # fill the room from the store), and it is no reconnect.
        assert told == [0] and broker.reconnects == 0
        await broker.ping()
        await eventually(lambda: arrives(broker, got, b"first"))
        # One warning for the whole wait, not one per attempt.
        waits = [r for r in caplog.records if "unreachable at start" in r.getMessage()]
        assert len(waits) == 1

        # Lost: a publish meanwhile fails and starts the guard's cooldown ...
        rs.stop()
        await eventually(lambda: not broker.connected.is_set())
        with pytest.raises(BrokerUnavailable):
            await broker.publish("t:room:{a}", b"lost")
        assert not broker.context.guard.usable()
        # ... restored: counted, told, the channel held again, the cooldown over.
        rs.start()
        # A relink that raced the server's death (its socket taken before the close
        # was seen) may come and go first: the restore that counts is the one whose
        # link is up with the cooldown over.
        await eventually(lambda: broker.connected.is_set() and broker.context.guard.usable())
        assert broker.reconnects >= 1 and told == list(range(broker.reconnects + 1))
        await eventually(lambda: arrives(broker, got, b"again"))
        assert b"lost" not in [data for _channel, data in got]
    finally:
        await broker.close()
        rs.stop()


async def test_a_redis_user_without_a_guard_tries_redis_on_every_call():
    rs = RedisServer()
    rs.start()
    client = aioredis.from_url(rs.url, socket_timeout=0.5, socket_connect_timeout=0.5)
    pipe = PipelinedConnection(client, timeout=0.5)
    cooled = RedisGuard(cooldown=3600.0)
    try:
        rs.stop()
        for guard in (NO_GUARD, cooled):
            (failed,) = await per_key(client, pipe, guard, [("k", [("INCR", "k")])])
            assert isinstance(failed, Exception)
        assert NO_GUARD.usable("k") and not cooled.usable("k")
        rs.start()
        # No guard: the next call goes to Redis; a guard in its cooldown skips it.
        assert await per_key(client, pipe, NO_GUARD, [("k", [("INCR", "k")])]) == [[1]]
        (skipped,) = await per_key(client, pipe, cooled, [("k", [("INCR", "k")])])
        assert isinstance(skipped, Exception)
        assert await client.get("k") == b"1"
    finally:
        await pipe.close()
        await client.aclose()
        rs.stop()


async def test_a_batch_sends_each_command_ahead_of_its_publish_and_none_where_none():
    """``publish_batch``'s ``ahead``: an entry per message, a command sent just before
    that message's publish (its reply in ``Sent.ahead``) or None for none."""
    rs = RedisServer()
    rs.start()
    broker = RedisBroker(rs.url, control_channel="t:control")
    got: list[tuple[str, bytes]] = []
    broker.on_message(lambda channel, data: got.append((channel, data)))
    try:
        await broker.start()
        await asyncio.wait_for(broker.connected.wait(), t(10))
        await broker.subscribe("t:room:{a}")
        await eventually(lambda: arrives(broker, got, b"ready"))
        sent = await broker.publish_batch(
            [("t:room:{a}", b"1"), ("t:room:{a}", b"2"), ("t:room:{a}", b"3")],
            ahead=[("INCRBY", "k", 5), None, ("GET", "k")],
        )
        assert [s.ahead for s in sent] == [5, None, b"5"]
        assert all(s.lost is None for s in sent)
        await eventually(lambda: [d for _c, d in got][-3:] == [b"1", b"2", b"3"])
        with pytest.raises(ValueError):
            await broker.publish_batch([("t:room:{a}", b"4")], ahead=[None, None])
    finally:
        await broker.close()
        rs.stop()
