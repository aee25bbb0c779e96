"""Redis Pub/Sub broker (``redis.asyncio``).

One subscriber connection per process carries every room channel this
instance holds; publishing and keys (cache, rate limits) share one pool and
one pipelined connection (:mod:`chat_gateway.redisio.pipelined`). Over
``redis+sentinel://`` that pool is redis-py's Sentinel-managed one
(:mod:`chat_gateway.redisio.clients`): each connection it opens, the subscriber link's
included, goes to the primary the sentinels name at that moment, so the
reconnect is also how the broker follows a failover.

The subscriber link is kept up and probed as :mod:`chat_gateway.pubsub.link` describes: a
dropped link is re-established with backoff, every channel is subscribed
again, and ``on_reconnect`` fires so the gateway can fill from the store what
was published while it was away. ``subscribe`` only records the channel when
the link is down; the reconnect subscribes it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from redis.exceptions import RedisError

from chat_gateway.pubsub.base import BrokerUnavailable, Sent
from chat_gateway.pubsub.link import LinkedBroker
from chat_gateway.redisio.context import RedisContext
from chat_gateway.redisio.pipelined import Command, Subscription
from chat_gateway.redisio.urls import redis_address


class RedisBroker(LinkedBroker):
    log = logging.getLogger("pubsub.redis")

    def __init__(
        self,
        url: str,
        *,
        probe_interval: float = 5.0,
        probe_timeout: float | None = None,
        connect_timeout: float = 2.0,
        command_timeout: float = 1.0,
        control_channel: str = "chat:control",
        context: RedisContext | None = None,
    ) -> None:
        """``context``: the Redis shared with the users of keys (chat_gateway.redisio.context),
        started and closed by whoever made it; without one the broker makes its own
        from ``url``."""
        super().__init__(
            probe_interval=probe_interval,
            probe_timeout=probe_timeout,
            connect_timeout=connect_timeout,
            command_timeout=command_timeout,
            control_channel=control_channel,
            context=context
            or RedisContext.for_url(
                url, connect_timeout=connect_timeout, command_timeout=command_timeout
            ),
            owns_context=context is None,
        )
        self.url = url
        self._subscriber: Subscription | None = None  # the subscriber link, while there is one

    async def start(self) -> None:
        await self._start_context()
        self._start_keeping()

    async def close(self) -> None:
        await self._stop_keeping()
        await self._unlink()
        await self._close_context()

    # -- the subscriber link ------------------------------------------------

    async def _link(self, first: bool) -> None:
        link = Subscription(self._redis, self._received, timeout=self.command_timeout)
        self._subscriber = link
        await link.open()
        # The control channel keeps the link open (and probed) with no room held.
        held = set(self._channels)
        link.send("SUBSCRIBE", self.control_channel, *sorted(held))
        # Every channel is subscribed before the broker says it is linked (and the
        # gateway fills from the store what it may have missed).
        await link.synced()
        # Channels added or dropped while that subscribe was in flight.
        if self._channels - held:
            link.send("SUBSCRIBE", *sorted(self._channels - held))
        if held - self._channels:
            link.send("UNSUBSCRIBE", *sorted(held - self._channels))

    async def _hold(self) -> None:
        assert self._subscriber is not None
        await self._subscriber.hold(self.probe_interval, self.probe_timeout)

    def _received(self, push: list[Any]) -> None:
        if push[0] == b"message":
            channel = push[1].decode()
            if channel == self.control_channel:
                self._on_control(push[2])
            else:
                self._on_message(channel, push[2])

    async def _unlink(self) -> None:
        self.connected.clear()
        link, self._subscriber = self._subscriber, None
        if link is not None:
            await link.close()

    def _address(self) -> str:
        return redis_address(self.url)

    def _restored(self) -> str:
        return f"broker link restored; resubscribed {len(self._channels)} channels"

    async def subscribe(self, channel: str) -> None:
        if channel in self._channels:
            return
        self._channels.add(channel)
        await self._send("SUBSCRIBE", channel)

    async def unsubscribe(self, channel: str) -> None:
        if channel not in self._channels:
            return
        self._channels.discard(channel)
        await self._send("UNSUBSCRIBE", channel)

    async def _send(self, command: str, channel: str) -> None:
        link = self._subscriber
        if link is None:
            return  # the reconnect applies the channel set
        try:
            link.send(command, channel)
        except RedisError as exc:
            # The link is failing; the loop notices, reconnects and resubscribes the set.
            self.log.warning("broker %s %s failed: %r", command, channel, exc)

    # -- publishing -----------------------------------------------------------

    async def publish(self, channel: str, data: bytes) -> None:
        guard = self.context.guard
        if not guard.usable():
            raise BrokerUnavailable("Redis failed moments ago; not waiting on it again yet")
        try:
            await self._redis.publish(channel, data)
        except (RedisError, OSError) as exc:
            guard.failed(None, exc)
            raise BrokerUnavailable(f"Redis publish failed: {exc!r}") from exc

    async def publish_control(self, data: bytes) -> None:
        """Published on the control channel, which every instance's link holds (this
        one's too, so the sender acts through the same path as the others)."""
        await self.publish(self.control_channel, data)

    def carries(self, redis: Any) -> bool:
        context = self.context
        return (
            redis is not None
            and context.started
            and redis is context.client
            and context.guard.usable()
        )

    async def publish_batch(
        self, messages: Sequence[tuple[str, bytes]], *, ahead: Sequence[Command | None] = ()
    ) -> list[Sent]:
        """Every message, and the commands ahead of them, in one round trip over the
        pipelined connection, shared with whatever other callers send at that
        moment (a post's cache update and publish go together)."""
        if ahead and len(ahead) != len(messages):
            raise ValueError("publish_batch: one entry ahead of each message, or none")
        batch, guard = self.context.batch, self.context.guard
        if batch is None:
            raise BrokerUnavailable("the broker is not started")
        if not guard.usable():
            raise BrokerUnavailable("Redis failed moments ago; not waiting on it again yet")
        commands: list[Command] = []
        places: list[tuple[int | None, int]] = []  # per message: its command ahead, its publish
        for i, (channel, data) in enumerate(messages):
            command = ahead[i] if ahead else None
            if command is not None:
                commands.append(command)
            commands.append(("PUBLISH", channel, data))
            places.append((None if command is None else len(commands) - 2, len(commands) - 1))
        try:
            replies = await batch.run(commands)
        except Exception as exc:
            guard.failed(None, exc)
            replies = [exc] * len(commands)
        sent = []
        for before, publish in places:
            reply = replies[publish]
            sent.append(
                Sent(
                    None if before is None else replies[before],
                    reply if isinstance(reply, BaseException) else None,
                )
            )
        return sent

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            raise BrokerUnavailable(f"Redis unreachable: {exc!r}") from exc
        if not self.connected.is_set():
            raise BrokerUnavailable("Redis answers, but the subscriber link is not up yet")
