"""The pipelined connection (chat_gateway.redisio.pipelined) against real redis-servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from chat_gateway.redisio.guard import NO_GUARD, RedisGuard
from chat_gateway.redisio.pipelined import PipelinedConnection, per_key
from tests import harness
from tests.proxy import tcp_proxy


@pytest.fixture
async def shared(redis_prefix: str) -> AsyncIterator[tuple[aioredis.Redis, PipelinedConnection]]:
    """A client of the machine's Redis and a batch over it (this test's keys only)."""
    client = aioredis.from_url(harness.REDIS_URL)
    batch = PipelinedConnection(client)
    try:
        yield client, batch
    finally:
        await batch.close()
        await client.aclose()


async def test_concurrent_callers_get_their_own_replies_in_order(shared, redis_prefix) -> None:
    client, batch = shared
    key = f"{redis_prefix}counter"

    async def caller(i: int) -> list[object]:
        return await batch.run(
            [("INCR", key), ("ECHO", f"caller {i}"), ("GET", f"{redis_prefix}missing")]
        )

    results = await asyncio.gather(*(caller(i) for i in range(200)))
    for i, (_count, echo, missing) in enumerate(results):
        assert echo == f"caller {i}".encode()
        assert missing is None
    # Each INCR ran once, in the order the callers queued them.
    assert [r[0] for r in results] == list(range(1, 201))
    assert int(await client.get(key)) == 200


async def test_nothing_to_send_is_answered_at_once_and_fails_no_other_caller(
    shared, redis_prefix
) -> None:
    """A run of no command (an empty page's MGETs) waits for no reply: before, its
    waiter was never answered, and its deadline failed the link under every caller."""
    _client, batch = shared
    key = f"{redis_prefix}k"
    slow = asyncio.ensure_future(
        batch.run([("EVAL", "local t = redis.call('TIME') return 1", 0), ("SET", key, "v")])
    )
    assert await asyncio.wait_for(batch.run([]), timeout=0.5) == []
    assert await slow == [1, b"OK"]
    # the link still serves after the batch's deadline has passed
    await asyncio.sleep(batch.timeout + 0.2)
    assert await batch.run([("GET", key)]) == [b"v"]


async def test_an_error_reply_takes_its_place_and_spoils_nothing_else(shared, redis_prefix) -> None:
    _client, batch = shared
    key = f"{redis_prefix}k"
    replies = await batch.run(
        [("SET", key, "v"), ("EVALSHA", "0" * 40, 0), ("INCR", key), ("GET", key)]
    )
    assert replies[0] == b"OK"
    assert isinstance(replies[1], NoScriptError)
    assert isinstance(replies[2], ResponseError)  # not an integer
    assert replies[3] == b"v"


async def test_error_replies_are_the_exceptions_redis_py_raises_for_them(
    shared, redis_prefix
) -> None:
    client, batch = shared
    key = f"{redis_prefix}s"
    await client.set(key, "text")
    commands = [("EVALSHA", "0" * 40, 0), ("INCR", key), ("NOSUCHCOMMAND",), ("LPUSH", key, "x")]
    replies = await batch.run(commands)
    for command, reply in zip(commands, replies, strict=True):
        with pytest.raises(ResponseError) as raised:
            await client.execute_command(*command)
        assert type(reply) is type(raised.value)
        assert str(reply) == str(raised.value)


async def test_a_cancelled_caller_disturbs_no_other(shared, redis_prefix) -> None:
    _client, batch = shared
    slow = asyncio.ensure_future(batch.run([("BLPOP", f"{redis_prefix}none", 0.3)]))
    await asyncio.sleep(0.05)
    slow.cancel()
    # Queued behind the cancelled call on the same connection: answered in turn.
    assert await batch.run([("ECHO", "after")]) == [b"after"]
    assert slow.cancelled()
    assert await batch.run([("ECHO", "next")]) == [b"next"]


async def test_silent_redis_times_out_every_waiter_then_recovers() -> None:
    await harness.check_redis()
    async with tcp_proxy(harness.REDIS_URL) as (proxy, url):
        client = aioredis.from_url(url)
        batch = PipelinedConnection(client, timeout=0.3)
        try:
            assert await batch.run([("PING",)]) == [b"PONG"]
            proxy.hold()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            results = await asyncio.gather(
                *(batch.run([("ECHO", str(i))]) for i in range(5)), return_exceptions=True
            )
            assert all(isinstance(r, RedisTimeoutError) for r in results), results
            assert 0.25 < loop.time() - t0 < 2.0
            proxy.restore()
            assert await batch.run([("ECHO", "back")]) == [b"back"]
        finally:
            await batch.close()
            await client.aclose()


async def test_restarted_redis_fails_the_waiters_then_a_new_connection_serves() -> None:
    server = harness.RedisServer()
    server.start()
    client = aioredis.from_url(server.url)
    batch = PipelinedConnection(client, timeout=1.0)
    try:
        assert await batch.run([("SET", "k", "1")]) == [b"OK"]
        waiting = asyncio.ensure_future(batch.run([("BLPOP", "none", 5)]))
        await asyncio.sleep(0.05)
        server.stop()
        with pytest.raises(RedisConnectionError):
            await waiting
        with pytest.raises(RedisConnectionError):
            await batch.run([("PING",)])  # down: refused, said at once
        server.start()
        assert await batch.run([("SET", "k", "2"), ("GET", "k")]) == [b"OK", b"2"]
    finally:
        await batch.close()
        await client.aclose()
        server.stop()


async def test_password_and_database_from_the_url() -> None:
    server = harness.RedisServer(extra_args=("--requirepass", "s3cret"))
    server.start()
    url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
    client = aioredis.from_url(url)
    batch = PipelinedConnection(client)
    try:
        assert await batch.run([("SET", "k", "in db 3")]) == [b"OK"]
        assert await client.get("k") == b"in db 3"  # the client's database, too
        other = aioredis.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/0")
        assert await other.get("k") is None
        await other.aclose()
        wrong = aioredis.from_url(f"redis://:wrong@127.0.0.1:{server.port}/0")
        bad = PipelinedConnection(wrong)
        with pytest.raises(AuthenticationError):
            await bad.run([("PING",)])
        await bad.close()
        await wrong.aclose()
    finally:
        await batch.close()
        await client.aclose()
        server.stop()


async def test_per_key_groups_share_a_round_trip_and_fail_alone(shared, redis_prefix) -> None:
    client, batch = shared
    guard = RedisGuard(cooldown=60)
    a, b = f"{redis_prefix}a", f"{redis_prefix}b"
    await client.set(b, "text")
    results = await per_key(
        client, batch, guard, [(a, [("SET", a, "1"), ("INCR", a)]), (b, [("INCR", b), ("GET", b)])]
    )  # INCR of a string: the group's error
    assert results[0] == [b"OK", 2]
    assert isinstance(results[1], ResponseError)
    assert not guard.usable(b)  # told of the failure
    # while the guard says so, nothing is sent
    skipped = await per_key(client, batch, guard, [(a, [("INCR", a)])])
    assert isinstance(skipped[0], RedisConnectionError)
    assert await client.get(a) == b"2"
    # without a batch (as over a cluster), each key's commands go on their own
    alone = await per_key(client, None, NO_GUARD, [(a, [("INCR", a)]), (b, [("GET", b)])])
    assert alone == [[3], [b"text"]]


async def test_closed_batch_refuses(shared) -> None:
    _client, batch = shared
    assert await batch.run([("ECHO", "x")]) == [b"x"]
    await batch.close()
    with pytest.raises(RedisConnectionError):
        await batch.run([("ECHO", "y")])
