"""The pieces the brokers and other Redis users share, in this process: the link
loop of the Redis brokers (chat_gateway.pubsub.link) against a redis-server of the test's own,
the guard of a Redis user that has none (chat_gateway.redisio.guard.NO_GUARD), and the batched
publish every broker offers (chat_gateway.pubsub.base.Broker.publish_batch)."""

from __future__ import annotations

import asyncio
import logging
import random
import socket

import pytest
import redis.asyncio as aioredis

from chat_gateway.pubsub import BrokerUnavailable, Sent
from chat_gateway.pubsub.memory import MemoryBroker
from chat_gateway.pubsub.redis import RedisBroker
from chat_gateway.redisio.guard import NO_GUARD, RedisGuard
from chat_gateway.redisio.pipelined import PipelinedConnection, per_key
from tests.harness import RedisServer, eventually, t


def outside_ephemeral_range() -> int:
    """A free port below the kernel's ephemeral range. A client that keeps
    reconnecting to a port in that range while nothing listens there can be
    handed that very port as its own and connect to itself (TCP simultaneous
    open), and would take that for the server coming back."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for port in random.sample(range(10_000, low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


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
    rs = RedisServer(outside_ephemeral_range())  # not started yet: nothing answers there
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
        await asyncio.wait_for(broker.connected.wait(), t(10))
        assert told == [0, 1] and broker.reconnects == 1
        assert broker.context.guard.usable()
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


async def test_the_memory_broker_publishes_a_batch_in_order():
    broker = MemoryBroker()
    got: list[tuple[str, bytes]] = []
    broker.on_message(lambda channel, data: got.append((channel, data)))
    # Not started: every message is reported lost, none raised.
    lost = await broker.publish_batch([("a", b"1"), ("b", b"2")])
    assert [type(s.lost) for s in lost] == [BrokerUnavailable, BrokerUnavailable]
    await broker.start()
    try:
        await broker.subscribe("a")
        sent = await broker.publish_batch([("a", b"1"), ("b", b"x"), ("a", b"2")])
        assert sent == [Sent(None, None)] * 3
        await eventually(lambda: len(got) == 2)
        assert got == [("a", b"1"), ("a", b"2")]  # in order; "b" has no subscriber
        assert not broker.carries(None)
        with pytest.raises(ValueError):
            await broker.publish_batch([("a", b"3")], ahead=[("INCR", "k")])
    finally:
        await broker.close()
