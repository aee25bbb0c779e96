"""Chat on top of messages, this instance's part: edits and deletes, typing notices,
read receipts (the routes and frames that use it: chat_gateway.api.chat, chat_gateway.transports.ws).

- An edit or delete commits in the store (which numbers it with the room's
  change counter and logs it), voids the room's cached window on every
  instance, then is published on the room's channel (``c:``) and sequenced by
  each hub after the messages committed before it (chat_gateway.delivery.hub).
- With Redis the room's last change number is also raised there
  (``{room}:change``) before the publish; every instance compares it with what
  it dispatched every ``POSITION_INTERVAL`` seconds and fills the rest from the
  store, so a lost publish still arrives (as a lost message does, by the seq key).
- Typing (``t:``) and read receipts (``r:``) are published on the room's
  channel, never stored. Typing passes at most once per user and room every
  ``TYPING_INTERVAL`` seconds: across instances with Redis (a key set with NX
  and an expiry), per instance without it. A receipt goes out at most once per
  user and room every ``RECEIPT_DEBOUNCE`` seconds per instance, with the
  latest position.

:class:`Chat` is the variant without Redis, :class:`RedisChat` the one with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from chat_gateway.config import Settings
from chat_gateway.core.wire import encode_change, encode_read, encode_typing
from chat_gateway.delivery.hub import Hub
from chat_gateway.delivery.moderation import restricted
from chat_gateway.errors import ApiError
from chat_gateway.metrics import Metrics
from chat_gateway.periodic import every
from chat_gateway.pubsub import Broker, BrokerUnavailable
from chat_gateway.redisio.context import RedisContext
from chat_gateway.redisio.script import Script
from chat_gateway.storage import (
    Change,
    HistoryCache,
    Message,
    MessageDeleted,
    MessageNotFound,
    NotAuthor,
    ReadPosition,
    Store,
)
from chat_gateway.storage.moderation import Restricted

log = logging.getLogger("gateway.chat")

TYPING_INTERVAL = 2.0
RECEIPT_DEBOUNCE = 1.0
# Typing windows kept per instance; past it the expired ones go.
LOCAL_TYPING_MAX = 10_000


# KEYS: the room's change key; ARGV: number, ttl. Raised, never lowered.
_RAISE_CHANGE = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 1
"""


class Chat:
    """Changes, typing and read receipts on one instance without Redis.

    ``ensure_open`` refuses a change once the instance shuts down; ``committed`` is
    told after every change the store committed (the webhooks send its events)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        broker: Broker,
        hub: Hub,
        history: HistoryCache,
        metrics: Metrics,
        *,
        ensure_open: Callable[[], None],
        committed: Callable[[], None],
    ) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self.hub = hub
        self.history = history
        self.metrics = metrics
        self.ensure_open = ensure_open
        self.committed = committed
        self._typing: dict[tuple[str, str], float] = {}  # window ends
        self._receipts: dict[tuple[str, str], int] = {}  # waiting to go out: latest seq
        self._timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        pass

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- edits and deletes ---------------------------------------------------

    async def change(
        self,
        room: str,
        seq: int,
        text: str | None,
        *,
        author: str | None,
        idempotency_key: tuple[str, str] | None = None,
    ) -> Message:
        """Edit (``text``) or delete (None) a message; ``author``: only theirs, None:
        any; ``idempotency_key``: ``(owner, key)``. Acknowledged once the store
        committed and the cache was voided. A store that cannot be reached raises
        ``StoreUnavailable`` (nothing was changed)."""
        self.ensure_open()
        try:
            change, msg = await self.store.change(
                room, seq, text, author=author, idempotency_key=idempotency_key
            )
        except MessageNotFound as exc:
            raise ApiError("not_found", str(exc)) from None
        except NotAuthor:
            raise ApiError(
                "forbidden",
                "only the message's author (or a moderator of the "
                "room, or an API key) may edit or delete it",
            ) from None
        except Restricted as exc:
            raise restricted(exc) from None
        if change is not None:  # None: nothing changed (a repeated delete, the same text)
            await self._committed(room, change)
        return msg

    async def react(self, room: str, seq: int, user: str, reaction: str, *, add: bool) -> Message:
        """Add (``add``) or remove ``user``'s ``reaction``; a change like an edit (the
        store numbers it, the cache is voided, subscribers get ``reactions_updated``
        in commit order). Adding one there already or removing one not there
        changes nothing and answers the message as it is."""
        self.ensure_open()
        try:
            change, msg = await self.store.react(room, seq, user, reaction, add=add)
        except MessageNotFound as exc:
            raise ApiError("not_found", str(exc)) from None
        except MessageDeleted as exc:
            raise ApiError("message_deleted", str(exc)) from None
        except Restricted as exc:
            raise restricted(exc) from None
        if change is not None:
            await self._committed(room, change)
        return msg

    async def announce(self, room: str, change: Change) -> None:
        """A change another write committed (a reply's thread change, by the
        publisher): voided, raised and published as this instance's own changes are."""
        await self._committed(room, change)

    async def _committed(self, room: str, change: Change) -> None:
        """After a change committed: the webhooks told, the cached window voided on
        every instance, the change position raised, the change published."""
        self.committed()
        await self.history.changed(room)
        await self._raise_change_position(room, change.change)
        if self.settings.fault_skip_publish:  # test-only: killed after commit
            return
        try:
            await self.broker.publish(self.hub.channel(room), encode_change(change))
        except BrokerUnavailable as exc:
            log.warning("live change lost, delivery falls back to the store: %s", exc)

    async def _raise_change_position(self, room: str, number: int) -> None:
        """Where instances share a change position, raise the room's to ``number``."""

    # -- typing ----------------------------------------------------------------

    async def typing(self, room: str, user: str) -> None:
        """Tell the room's other subscribers that ``user`` types, unless they were
        told less than ``TYPING_INTERVAL`` ago; best effort, never an error."""
        if not await self._typing_window(room, user):
            return
        try:
            await self.broker.publish(
                self.hub.channel(room),
                encode_typing(room, user),
            )
        except BrokerUnavailable as exc:
            log.debug("typing notice lost: %s", exc)

    async def _typing_window(self, room: str, user: str) -> bool:
        """Whether a typing notice of ``user`` in ``room`` may go out now (this instance's
        windows)."""
        now = time.monotonic()
        if len(self._typing) > LOCAL_TYPING_MAX:
            self._typing = {k: end for k, end in self._typing.items() if end > now}
        if self._typing.get((room, user), 0.0) > now:
            return False
        self._typing[(room, user)] = now + TYPING_INTERVAL
        return True

    # -- read positions ----------------------------------------------------------

    async def mark_read(self, user: str, room: str, seq: int) -> ReadPosition:
        pos = await self.store.mark_read(user, room, seq)
        key = (room, user)
        self._receipts[key] = pos.seq
        if key not in self._timers:
            self._timers[key] = asyncio.get_running_loop().call_later(
                RECEIPT_DEBOUNCE, self._receipt_due, key
            )
        return pos

    def _receipt_due(self, key: tuple[str, str]) -> None:
        self._timers.pop(key, None)
        seq = self._receipts.pop(key, None)
        if seq is None:
            return
        task = asyncio.ensure_future(self._send_receipt(key[0], key[1], seq))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_receipt(self, room: str, user: str, seq: int) -> None:
        try:
            await self.broker.publish(
                self.hub.channel(room),
                encode_read(room, user, seq),
            )
        except BrokerUnavailable as exc:
            log.debug("read receipt lost: %s", exc)


class RedisChat(Chat):
    """Changes, typing and read receipts with Redis: the change position is shared and
    checked, typing windows are shared (this instance's own while Redis fails).
    ``start`` begins the change position check."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        broker: Broker,
        hub: Hub,
        history: HistoryCache,
        metrics: Metrics,
        *,
        redis: RedisContext,
        ensure_open: Callable[[], None],
        committed: Callable[[], None],
    ) -> None:
        super().__init__(
            settings,
            store,
            broker,
            hub,
            history,
            metrics,
            ensure_open=ensure_open,
            committed=committed,
        )
        self.redis = redis.client
        self.guard = redis.guard
        self.batch = redis.batch
        self._raise = Script(self.redis, _RAISE_CHANGE)
        self._check: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._check = every(
            self.settings.position_interval, self.check_changes, "change position check"
        )

    async def close(self) -> None:
        if self._check is not None:
            self._check.cancel()
            await asyncio.gather(self._check, return_exceptions=True)
        await super().close()

    def _change_key(self, room: str) -> str:
        return f"{self.settings.key_prefix}{{{room}}}:change"

    async def check_changes(self) -> None:
        """Fill every held room whose last change in Redis is ahead of what was dispatched."""
        rooms = list(self.hub.positions())
        if not rooms:
            return
        # One MGET per thousand rooms over one Redis (HistoryCache.get_many).
        values = await self.history.get_many([self._change_key(room) for room in rooms])
        for room, value in zip(rooms, values, strict=True):
            if isinstance(value, BaseException) or value is None:
                continue
            if self.hub.fill_changes(room, latest=int(value)):
                self.metrics.gap_fills.labels("change_position").inc()

    async def _raise_change_position(self, room: str, number: int) -> None:
        try:
            await self._raise(
                keys=[self._change_key(room)], args=[number, self.settings.history_cache_ttl]
            )
        except Exception as exc:
            log.warning("change position not raised: %r", exc)

    async def _typing_window(self, room: str, user: str) -> bool:
        # This instance's window first: a burst of typing frames costs Redis one
        # SET per window, not one per frame.
        if not await super()._typing_window(room, user):
            return False
        if self.guard.usable():
            digest = hashlib.sha256(user.encode()).hexdigest()[:24]
            key = f"{self.settings.key_prefix}typing:{{{room}}}:{digest}"
            try:
                return bool(
                    await self.redis.set(key, b"1", nx=True, px=int(TYPING_INTERVAL * 1000))
                )
            except Exception as exc:
                log.debug("typing window not checked in Redis: %r", exc)
        return True
