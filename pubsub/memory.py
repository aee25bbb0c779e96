"""In-process broker for ``memory://``: one instance, no server."""

from __future__ import annotations

import asyncio

from pubsub.base import Broker, BrokerUnavailable


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

    async def publish_control(self, data: bytes) -> None:
        if self._loop is None:
            raise BrokerUnavailable("the broker is not started")
        self._loop.call_soon(self._control, data)

    def _control(self, data: bytes) -> None:
        if self._loop is not None:
            self.on_control(data)

    def _deliver(self, channel: str, data: bytes) -> None:
        if channel in self._channels:
            self.on_message(channel, data)

    async def subscribe(self, channel: str) -> None:
        self._channels.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._channels.discard(channel)

    async def ping(self) -> None:
        if self._loop is None:
            raise BrokerUnavailable("the broker is not started")
