"""The subscriber connection (chat_gateway.redisio.pipelined.Subscription) against real
redis-servers: pushes reach the handler as they are read, ``synced`` means every
subscribe took effect, and a link is given up (its ``hold`` raises) when it is lost,
silent, answered with an error, or its handler raises."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from chat_gateway.redisio.pipelined import Subscription
from tests import harness
from tests.harness import t
from tests.proxy import tcp_proxy


async def test_messages_reach_the_handler_once_synced_and_in_order(redis_prefix: str) -> None:
    await harness.check_redis()
    client = aioredis.from_url(harness.REDIS_URL)
    got: list[list[Any]] = []
    link = Subscription(client, got.append, timeout=t(2))
    channel = f"{redis_prefix}room"
    try:
        await link.open()
        link.send("SUBSCRIBE", channel, f"{redis_prefix}other")
        await link.synced()
        # Synced: the subscribe has taken effect, so the very first publish arrives.
        assert await client.publish(channel, b"first") == 1
        for i in range(100):
            await client.publish(channel, b"%d" % i)
        await harness.eventually(lambda: len(got) >= 103)
        kinds = [push[0] for push in got]
        assert kinds[:2] == [b"subscribe", b"subscribe"]
        assert got[2] == [b"message", channel.encode(), b"first"]
        assert [push[2] for push in got[3:]] == [b"%d" % i for i in range(100)]
        # Unsubscribed: a publish reaches nobody; the link stays up.
        link.send("UNSUBSCRIBE", channel)
        await link.synced()
        assert await client.publish(channel, b"gone") == 0
    finally:
        await link.close()
        await client.aclose()


async def test_an_error_reply_or_a_raising_handler_gives_the_link_up(redis_prefix: str) -> None:
    await harness.check_redis()
    client = aioredis.from_url(harness.REDIS_URL)

    def refuse(push: list[Any]) -> None:
        if push[0] == b"message":
            raise LookupError("handler gave up")

    for cause, expected in (("error", ResponseError), ("handler", LookupError)):
        link = Subscription(client, refuse, timeout=t(2))
        try:
            await link.open()
            link.send("SUBSCRIBE", f"{redis_prefix}c")
            await link.synced()
            holding = asyncio.ensure_future(link.hold(60.0, 60.0))
            if cause == "error":
                link.send("GET", "k")  # refused in subscribed mode: an error reply
            else:
                await client.publish(f"{redis_prefix}c", b"x")
            with pytest.raises(expected):
                await asyncio.wait_for(holding, t(5))
            # Never reopened: whoever holds it makes a new one and subscribes again.
            with pytest.raises(RedisConnectionError):
                await link.open()
            with pytest.raises(RedisConnectionError):
                link.send("PING")
        finally:
            await link.close()
    await client.aclose()


async def test_a_silent_link_is_probed_and_given_up_and_a_lost_one_at_once() -> None:
    await harness.check_redis()
    async with tcp_proxy(harness.REDIS_URL) as (proxy, url):
        client = aioredis.from_url(url)
        link = Subscription(client, lambda push: None, timeout=t(2))
        try:
            await link.open()
            link.send("SUBSCRIBE", "probe-test")
            await link.synced()
            proxy.hold()  # no data, no RST: only the probe can tell
            with pytest.raises(RedisConnectionError, match="silent"):
                await asyncio.wait_for(link.hold(0.2, 0.3), t(10))
        finally:
            proxy.restore()
            await link.close()
            await client.aclose()
    server = harness.RedisServer()
    server.start()
    client = aioredis.from_url(server.url)
    link = Subscription(client, lambda push: None, timeout=t(2))
    try:
        await link.open()
        link.send("SUBSCRIBE", "c")
        await link.synced()
        holding = asyncio.ensure_future(link.hold(60.0, 60.0))
        server.stop()
        with pytest.raises(RedisConnectionError, match="lost"):
            await asyncio.wait_for(holding, t(10))
    finally:
        await link.close()
        await client.aclose()
        server.stop()


async def test_a_subscriber_link_authenticates_as_the_client_does() -> None:
    """The password of the client's URL opens the link (Pub/Sub ignores the database);
    a wrong one is refused at open, before anything is subscribed."""
    server = harness.RedisServer(extra_args=("--requirepass", "s3cret"))
    server.start()
    client = aioredis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/3")
    got: list[list[Any]] = []
    link = Subscription(client, got.append, timeout=t(2))
    wrong = aioredis.from_url(f"redis://:wrong@127.0.0.1:{server.port}/0")
    refused = Subscription(wrong, got.append, timeout=t(2))
    try:
        await link.open()
        link.send("SUBSCRIBE", "c")
        await link.synced()
        assert await client.publish("c", b"hello") == 1
        await harness.eventually(lambda: [b"message", b"c", b"hello"] in got)
        with pytest.raises(AuthenticationError):
            await refused.open()
    finally:
        await link.close()
        await refused.close()
        await client.aclose()
        await wrong.aclose()
        server.stop()
