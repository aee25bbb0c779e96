"""What the Redis brokers share: subscriber links kept up, and each link watched.

:class:`LinkedBroker` holds the channel set and runs one loop, :meth:`LinkedBroker._keep_linked`,
for the plain broker (one link) and the cluster broker (a link per primary):
make the links and subscribe every held channel (``_link``), mark the broker
connected, end the guard's cooldowns, call ``on_reconnect`` (after a loss, or
when channels were held before the first link), then wait until the links are
lost (``_hold``). A failure anywhere drops what is left (``_unlink``) and tries
again with exponential backoff, from ``BACKOFF_MIN`` to ``BACKOFF_MAX`` seconds.

:class:`chat_gateway.redisio.pipelined.Subscription` is each link: pushes are handed
to the broker as they are read, and the link is probed: when nothing has
arrived for ``probe_interval`` seconds a PING goes down it, and a link that
answers neither data nor PONG within ``probe_timeout`` is given up as dead.
"""

from __future__ import annotations

import asyncio
import logging
from abc import abstractmethod
from typing import Any

from chat_gateway.pubsub.base import Broker, BrokerUnavailable
from chat_gateway.redisio.context import RedisContext

BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0


class LinkedBroker(Broker):
    """A broker whose subscriber links to Redis are kept up by one loop (see the module)."""

    log: logging.Logger
    # The log lines of the loop, which say which kind of Redis this is.
    what = "Redis"

    def __init__(
        self,
        *,
        probe_interval: float,
        probe_timeout: float | None,
        connect_timeout: float,
        command_timeout: float,
        control_channel: str,
        context: RedisContext,
        owns_context: bool,
    ) -> None:
        super().__init__()
        # The Redis this broker publishes through, shared with every user of keys;
        # started and closed here only when the broker made it itself.
        self.context = context
        self._owns_context = owns_context
        if probe_interval <= 0:
            raise ValueError("probe_interval must be positive")
        self.probe_interval = probe_interval
        self.probe_timeout = probe_timeout or max(1.0, probe_interval)
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.control_channel = control_channel
        self._channels: set[str] = set()  # the room channels held, whether linked or not
        self.connected = asyncio.Event()  # every held channel is on a live link
        self.placed = asyncio.Event()  # linked at least once since start
        self._keeper: asyncio.Task[None] | None = None

    @property
    def _redis(self) -> Any:
        """The context's client; ``BrokerUnavailable`` before it was started."""
        if not self.context.started:
            raise BrokerUnavailable("the broker is not started")
        return self.context.client

    async def _start_context(self) -> None:
        if self._owns_context:
            await self.context.start()

    async def _close_context(self) -> None:
        if self._owns_context:
            await self.context.close()

    def _start_keeping(self) -> None:
        # No failure at start when Redis is down: the loop keeps trying, and
        # /readyz reports the broker until it answers.
        self._keeper = asyncio.create_task(self._keep_linked(), name="broker-links")

    async def _stop_keeping(self) -> None:
        if self._keeper is not None:
            keeper, self._keeper = self._keeper, None
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
        self.connected.clear()

    async def _keep_linked(self) -> None:
        backoff = BACKOFF_MIN
        first = True
        warned = False
        while True:
            try:
                await self._link(first)
                self.context.guard.reset()
                self.connected.set()
                self.placed.set()
                if not first:
                    self.reconnects += 1
                    self.log.warning("%s", self._restored())
                if not first or self._channels:
                    self._on_reconnect()
                first = False
                backoff = BACKOFF_MIN
                await self._hold()
                self.connected.clear()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.connected.is_set():
                    self.log.warning("broker links lost: %r", exc)
                elif first and not warned:  # once, until the first link is made
                    warned = True
                    self.log.warning(
                        "%s at %s is unreachable at start (%s); running degraded "
                        "until it answers (/readyz reports the broker)",
                        self.what,
                        self._address(),
                        exc,
                    )
                self.connected.clear()
                await self._unlink()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    @abstractmethod
    async def _link(self, first: bool) -> None:
        """Make the links and subscribe every held channel and the control channel."""

    @abstractmethod
    async def _hold(self) -> None:
        """Return or raise when a link is lost."""

    @abstractmethod
    async def _unlink(self) -> None:
        """Drop what is left of the links after a failure."""

    @abstractmethod
    def _address(self) -> str:
        """Where Redis is, for a log line."""

    @abstractmethod
    def _restored(self) -> str:
        """The log line of a restored link."""
