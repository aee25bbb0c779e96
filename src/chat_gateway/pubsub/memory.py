"""In-process broker for ``memory://``: one instance, no server."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from chat_gateway.pubsub.base import Broker, BrokerUnavailable, Sent
from chat_gateway.redisio.pipelined import Command


class MemoryBroker(Broker):
    def __init__(self) -> None:
        super().__init__()
        self._channels: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        self._channels.clear()
        self._loop = None

    async def publish(self, channel: str, data: bytes) -> None:
        if self._loop is None:
            raise BrokerUnavailable("the broker is not started")
        if channel in self._channels:
            # Delivered on a later loop turn, in publish order, as a real broker would.
            self._loop.call_soon(self._deliver, channel, data)

    async def publish_batch(
        self, messages: Sequence[tuple[str, bytes]], *, ahead: Sequence[Command | None] = ()
    ) -> list[Sent]:
        """As many publishes; with no Redis there is nothing to send ahead."""
        if ahead:
            raise ValueError("the memory broker has no Redis to send commands to")
        if self._loop is None:
            unavailable = BrokerUnavailable("the broker is not started")
            return [Sent(None, unavailable) for _ in messages]
        for channel, data in messages:
            if channel in self._channels:
                self._loop.call_soon(self._deliver, channel, data)
        return [Sent(None, None) for _ in messages]

    async def publish_control(self, data: bytes) -> None:
        if self._loop is None:
            raise BrokerUnavailable("the broker is not started")
        self._loop.call_soon(self._control, data)

    def _control(self, data: bytes) -> None:
        if self._loop is not None:
            self._on_control(data)

    def _deliver(self, channel: str, data: bytes) -> None:
        if channel in self._channels:
            self._on_message(channel, data)

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def ping(self) -> None:
        if self._loop is None:
            raise BrokerUnavailable("the broker is not started")
