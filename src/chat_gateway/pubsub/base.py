"""The broker interface: moves opaque payloads between gateway instances.

Contract:

- ``publish(channel, data)`` hands ``data`` to every instance subscribed to
  ``channel`` at that moment, at most once (Redis Pub/Sub gives no more). The
  gateway turns that into exactly-once, in-order delivery with seqs and the
  store; the broker only has to keep the order of one publisher's messages on
  one channel. ``publish_batch`` does the same for many messages, in as few
  round trips as the broker can, and tells which were lost.
- Received payloads go to the handler registered with ``on_message``, called
  as ``handler(channel, data)`` on the event loop in arrival order; it must not
  block (the hub only enqueues). Until one is registered they are dropped.
- ``subscribe``/``unsubscribe`` change what this instance receives. They are
  idempotent and raise ``BrokerUnavailable`` if the broker cannot be reached, in
  which case nothing changed.
- When the link drops, the broker reconnects with backoff by itself, restores
  every subscription, then calls the ``on_reconnect`` handler: anything
  published in between was lost to this instance and the caller fills it from
  the store.
- ``publish_control(data)`` hands ``data`` to the ``on_control`` handler on
  every instance sharing the broker, this one included, at most once, in
  publish order per publisher: commands that act on every instance (the server
  API). It raises ``BrokerUnavailable`` when nothing could be sent. The control
  channel is held from ``start`` to ``close`` and restored with the others.
- A broker over Redis is given the :class:`~chat_gateway.redisio.context.RedisContext`
  (client, guard, pipelined connection) that the users of keys (cache, rate
  limits, presence) are given too; nobody asks the broker for its Redis.
- Constructors do no I/O; ``start`` connects, ``close`` releases everything.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from chat_gateway.redisio.pipelined import Command

MessageHandler = Callable[[str, bytes], None]
ReconnectHandler = Callable[[], None]
ControlHandler = Callable[[bytes], None]


class BrokerUnavailable(Exception):
    """The broker cannot be reached; nothing was published or (un)subscribed."""


class Sent(NamedTuple):
    """One message of :meth:`Broker.publish_batch`."""

    ahead: Any  # the reply to the command sent ahead of it; None when there was none
    lost: BaseException | None  # why the publish was lost; None when it went out


def _drop_message(channel: str, data: bytes) -> None:
    pass


def _no_reconnect() -> None:
    pass


def _drop_control(data: bytes) -> None:
    pass


class Broker(ABC):
    def __init__(self) -> None:
        self._on_message: MessageHandler = _drop_message
        self._on_reconnect: ReconnectHandler = _no_reconnect
        self._on_control: ControlHandler = _drop_control
        self.reconnects = 0

    # -- handlers ------------------------------------------------------------

    def on_message(self, handler: MessageHandler) -> None:
        """Receive every message of a subscribed channel (one handler: the last set)."""
        self._on_message = handler

    def on_reconnect(self, handler: ReconnectHandler) -> None:
        """Be told when the link was restored and messages may have been missed."""
        self._on_reconnect = handler

    def on_control(self, handler: ControlHandler | None) -> None:
        """Receive every control message; None drops them again."""
        self._on_control = handler or _drop_control

    # -- life ----------------------------------------------------------------

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def ping(self) -> None:
        """One round trip; raises BrokerUnavailable."""

    # -- channels ------------------------------------------------------------

    @abstractmethod
    async def subscribe(self, channel: str) -> None: ...

    @abstractmethod
    async def unsubscribe(self, channel: str) -> None: ...

    # -- publishing ----------------------------------------------------------

    @abstractmethod
    async def publish(self, channel: str, data: bytes) -> None: ...

    @abstractmethod
    async def publish_control(self, data: bytes) -> None:
        """Send ``data`` to ``on_control`` of every instance, this one included."""

    def carries(self, redis: Any) -> bool:
        """Whether :meth:`publish_batch` can send, in the same round trip, commands for
        ``redis`` ahead of the publishes: only when ``redis`` is this broker's own
        client and that can be used now. A broker that cannot says False."""
        return False

    async def publish_batch(
        self, messages: Sequence[tuple[str, bytes]], *, ahead: Sequence[Command | None] = ()
    ) -> list[Sent]:
        """Publish each ``(channel, data)`` in order; one :class:`Sent` per message.

        ``ahead`` (only where :meth:`carries` said so) holds one entry per message:
        a command sent just before that message's publish, its reply returned in
        ``Sent.ahead``, or None for none. A lost publish does not stop the others. Raises
        ``BrokerUnavailable`` only when nothing was sent because Redis failed
        moments ago (see :mod:`chat_gateway.redisio.guard`).

        This form publishes one message after another; a broker with a
        pipelined connection sends them all in one round trip.
        """
        if ahead:
            raise ValueError(f"{type(self).__name__} sends no commands ahead of its publishes")
        sent = []
        for channel, data in messages:
            try:
                await self.publish(channel, data)
            except BrokerUnavailable as exc:
                sent.append(Sent(None, exc))
            else:
                sent.append(Sent(None, None))
        return sent
