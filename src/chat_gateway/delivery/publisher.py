"""The write path: a post committed in the store, then announced to every instance.

A post goes one way: commit in the store (seq assigned there), raise the cache's
seq, publish on the room's channel, acknowledge. The publish is the fast path
only: if it is lost (Redis down, this process killed right after the commit),
every instance finds the message by its position check and fills it from the
store. Ephemeral events (``POST /v1/publish``, the server API's broadcast) are
published only, never stored.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from chat_gateway import tracing
from chat_gateway.config import Settings
from chat_gateway.core.wire import encode_event, encode_message, encode_state, traced
from chat_gateway.errors import ApiError
from chat_gateway.metrics import Metrics
from chat_gateway.pubsub import Broker, BrokerUnavailable
from chat_gateway.storage import (
    Change,
    HistoryCache,
    Message,
    MessageDeleted,
    MessageNotFound,
    Store,
)
from chat_gateway.storage.cache import Committed
from chat_gateway.storage.moderation import Restricted
from chat_gateway.storage.records import StateEntry

log = logging.getLogger("gateway")

Payload = tuple[str, bytes]  # a broker channel and what is published on it


class Poster(Protocol):
    """Who posts (an ``Identity`` of chat_gateway.access.auth): a token's ``sub``
    (``user``) or a client address, by ``name``."""

    @property
    def user(self) -> bool: ...

    @property
    def name(self) -> str: ...


def scoped_key(identity: Poster, key: str) -> str:
    """An ``Idempotency-Key`` as stored: qualified by the poster's identity, so keys
    are unique per (room, identity). The kind (a token's ``sub`` or a client
    address) and the name's length come first, so no two (identity, key) pairs
    give the same text whatever characters they hold."""
    kind = "sub" if identity.user else "addr"
    return f"{kind}:{len(identity.name)}:{identity.name}:{key}"


class Publisher:
    """Posts and ephemeral events. ``ensure_open`` refuses a post once the instance
    shuts down; ``committed`` is told after every commit of messages (the webhooks'
    dispatcher sends the events the commit wrote); ``channel`` names a room's
    broker channel (``Hub.channel``)."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        broker: Broker,
        history: HistoryCache,
        metrics: Metrics,
        *,
        channel: Callable[[str], str],
        ensure_open: Callable[[], None],
        committed: Callable[[], None],
        refused: Callable[[Restricted], ApiError],
        changed: Callable[[str, Change], Awaitable[None]] | None = None,
        local: Callable[[str, bytes], None] | None = None,
        origin: str | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.broker = broker
        self.history = history
        self.metrics = metrics
        self.channel = channel
        self.ensure_open = ensure_open
        self.committed = committed
        self.refused = refused  # the store's refusal of a banned or muted author
        # Announces a change a post committed (a reply's thread change): Chat.announce.
        self.changed = changed
        # Gives a payload to this instance's own subscribers before it is published
        # (Hub.local), and the instance's name in the events it publishes.
        self.local = local
        self.origin = origin

    async def post(
        self,
        room: str,
        author: str,
        text: str,
        *,
        identity: Poster,
        transport: str,
        idempotency_key: str | None = None,
        reply_to: int | None = None,
        mentions: tuple[str, ...] = (),
    ) -> tuple[Message, bool]:
        """Commit one post by ``identity``; return the message and whether it is new.

        ``reply_to``: a reply to that message of the room (``not_found`` when there is
        none, ``message_deleted`` when it is a tombstone); its parent's thread change
        is announced after the reply. ``mentions``: user ids, kept with the message.

        An ``idempotency_key`` is the poster's own: it is stored qualified by the
        identity (:func:`scoped_key`), so another identity's equal key is another
        key. A repeat whose message differs (text or author) from the one the key
        first stored is refused with ``idempotency_conflict``. A store that cannot
        be reached raises ``StoreUnavailable`` (nothing was stored).
        """
        self.ensure_open()
        if room == self.settings.fault_fail_room:  # test-only: an unexpected failure
            raise RuntimeError(f"injected failure while posting {text!r}")
        key = None if idempotency_key is None else scoped_key(identity, idempotency_key)
        try:
            msg, created = await self.store.append(
                room, author, text, key, reply_to=reply_to, mentions=mentions
            )
        except Restricted as exc:  # banned or muted as of the commit
            raise self.refused(exc) from None
        except MessageNotFound as exc:
            raise ApiError("not_found", f"reply_to: {exc}", field="reply_to") from None
        except MessageDeleted as exc:
            raise ApiError("message_deleted", f"reply_to: {exc}", field="reply_to") from None
        if created:
            self.metrics.accepted(transport)
            self.committed()
            await self._announce([msg])
            if msg.follow is not None and self.changed is not None:
                await self.changed(room, msg.follow)
        elif msg.text != text or msg.author != author:
            raise ApiError(
                "idempotency_conflict",
                "this Idempotency-Key was already used in this room for a different "
                "message; use a new key for a new message",
            )
        return msg, created

    async def post_many(
        self, posts: list[tuple[str, str, str]], *, transport: str
    ) -> list[Message | ApiError]:
        """Commit ``(room, author, text)`` posts in this order, together where the
        store can (one connection's publishes that arrived during a commit); a post
        whose author is banned or muted there gets its refusal in its place. A store
        that cannot be reached raises ``StoreUnavailable`` (nothing was stored)."""
        self.ensure_open()
        out: list[Message | ApiError] = []
        for done in await self.store.append_many(posts):
            if isinstance(done, Restricted):
                out.append(self.refused(done))
            elif isinstance(done, Exception):
                raise done
            else:
                out.append(done)
        msgs = [m for m in out if isinstance(m, Message)]
        self.metrics.accepted(transport, len(msgs))
        if msgs:
            self.committed()
            await self._announce(msgs)
        return out

    async def _announce(self, msgs: list[Message]) -> None:
        """Give the messages to this instance's own subscribers, then raise the cache's
        seq and publish them (:meth:`_published`)."""
        trace = tracing.traceparent()  # None unless tracing is on (chat_gateway.tracing)
        if self.settings.fault_cut_from_redis:  # test-only: Redis unreachable from here
            return
        if self.settings.fault_skip_publish:  # test-only: killed after commit
            for msg in msgs:
                await self.history.committed(msg)
            return
        await self._published(
            msgs, [(self.channel(msg.room), traced(encode_message(msg), trace)) for msg in msgs]
        )

    async def _published(self, written: Sequence[Committed], payloads: list[Payload]) -> None:
        """Give ``payloads`` (one per write of ``written``, in order) to this instance's
        own subscribers, raise each room's seq key in the cache to its newest write
        here, then publish them. Where the broker carries commands for the cache's
        Redis (they share a healthy client) all go in one round trip, with whatever
        other callers send at the same moment (chat_gateway.redisio.pipelined), a
        room's raise just ahead of its first publish; else the raises go first. Each
        command's failure keeps its meaning: an unraised seq is retried by the cache,
        a lost publish is filled from the store by every position check."""
        history = self.history
        payloads = self._locally(payloads)
        raises = raised_ahead(written)
        newest = [r for r in raises if r is not None]  # one write per room
        carried = self.broker.carries(history.redis)
        if not carried:
            for w in newest:
                await history.committed(w)
        try:
            sent = await self.broker.publish_batch(
                payloads,
                ahead=[None if r is None else history.raise_command(r) for r in raises]
                if carried
                else (),
            )
        except BrokerUnavailable as exc:  # nothing was sent
            log.warning("live publish lost, delivery falls back to the store: %s", exc)
            if carried:
                for w in newest:
                    await history.committed(w)
            return
        for r, (raised, lost) in zip(raises, sent, strict=True):
            if carried and r is not None:
                await history.queued_result(r, raised)
            if lost is not None:
                log.warning("live publish lost, delivery falls back to the store: %r", lost)

    async def write_state(
        self, room: str, writes: list[tuple[str, bytes | None]], *, author: str | None
    ) -> list[StateEntry]:
        """Commit writes to a state room's keys (``(key, value JSON)``, ``(key, None)``
        to delete) in one transaction, then, as a post does, raise the room's seq key
        in the cache (which a ``GET`` of the room's state on any instance reads to
        know whether the values it holds are current, ``Hub.state_document``) and
        publish one ``s:`` payload per write in seq order, in one round trip where
        the broker carries the cache's commands. A lost publish is filled from the
        store by every instance's position check. ``author``: a user, refused when
        banned or muted."""
        self.ensure_open()
        try:
            entries = await self.store.write_state(room, writes, author=author)
        except Restricted as exc:
            raise self.refused(exc) from None
        self.metrics.state_writes.inc(len(entries))
        history = self.history
        if self.settings.fault_cut_from_redis:  # test-only: Redis unreachable from here
            return entries
        if self.settings.fault_skip_publish:  # test-only: killed after commit
            await history.committed(entries[-1])
            return entries
        channel = self.channel(room)
        await self._published(entries, [(channel, encode_state(e)) for e in entries])
        return entries

    def _locally(self, payloads: list[Payload]) -> list[Payload]:
        """Give each ``(channel, payload)`` to this instance's own subscribers now, in
        order (they need not wait for the broker's round trip); the same list."""
        if self.local is not None:
            for channel, payload in payloads:
                self.local(channel, payload)
        return payloads

    async def publish_event(self, room: str, event: str, data: Any) -> None:
        """One ephemeral event: to this instance's subscribers at once, then through
        the broker to the other instances' (over the pipelined connection where the
        broker has one: a round trip shared with whatever else goes at that moment,
        no pooled connection taken)."""
        payloads = self._locally(
            [(self.channel(room), encode_event(room, event, data, self.origin))]
        )
        try:
            (sent,) = await self.broker.publish_batch(payloads)
        except BrokerUnavailable:
            sent = None
        if sent is None or sent.lost is not None:
            raise ApiError(
                "unavailable",
                "the broker is unavailable; the event reached this instance's subscribers only",
            )
        self.metrics.events_published.inc()

    async def publish_events(self, rooms: list[str], event: str, data: Any) -> None:
        """One ephemeral event to each of ``rooms`` (the server API's broadcast): in one
        round trip where the broker has a pipelined connection, else one publish
        after another (never all at once: that would take a pooled connection each)."""
        unavailable = ApiError(
            "unavailable", "the broker is unavailable; the event was not published to every room"
        )
        payloads = self._locally(
            [(self.channel(room), encode_event(room, event, data, self.origin)) for room in rooms]
        )
        try:
            sent = await self.broker.publish_batch(payloads)
        except BrokerUnavailable:
            raise unavailable from None
        published = sum(1 for outcome in sent if outcome.lost is None)
        self.metrics.events_published.inc(published)
        if published < len(rooms):
            log.warning(
                "broadcast not published to every room: %r",
                next(outcome.lost for outcome in sent if outcome.lost is not None),
            )
            raise unavailable


def raised_ahead(written: Sequence[Committed]) -> list[Committed | None]:
    """Per write, in order: the write whose seq its room's key is raised to just
    before it is published, which is the room's newest write of ``written`` ahead of
    the room's first one and nothing ahead of the others. Every write is then in its
    room's key before any is acknowledged, for one raise per room, not per write."""
    newest: dict[str, Committed] = {}
    for w in written:
        if w.room not in newest or w.seq > newest[w.room].seq:
            newest[w.room] = w
    return [newest.pop(w.room, None) for w in written]
