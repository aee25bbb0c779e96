"""History cache: the latest page of each room, in Redis, never stale after an ack.

Keys (the ``{room}`` hash tag keeps a room's keys in one cluster slot):

- ``P{room}:seq``  the room's latest committed seq, raised (never lowered) by
  ``committed`` after each commit and before the write is acknowledged;
- ``P{room}:page`` a hash ``{v: seq, d: page}``: the latest ``MAX_PAGE`` messages
  up to and including seq ``v``.

A page is served only when its ``v`` equals the current ``seq``. Messages are
immutable and seqs gapless, so the page for ``v`` has one possible content; a
reader that loaded an older page and writes it late cannot shadow a newer
write, because its ``v`` no longer matches. A read that starts after an ack sees
``seq`` at least that message's seq, so it either hits a page that holds it or
loads from the store. Loads are coalesced per instance by ``(room, seq)``.

Each instance also keeps the decoded windows of recently read rooms, by
version. A warm read is then one ``GET`` of the seq key: when it names a
version held here, the page is sliced from memory with no page transfer and
no decoding. A window for ``v`` never changes, so this is exactly as fresh as
the page in Redis.

A purge (moderation) breaks "one content per version": the page for ``v``
loses its messages. ``purged`` therefore deletes the room's seq and page keys
and counts the purge in ``P{room}:purged``. With no seq key no instance serves
a window it holds (a warm read needs the key to name its version), so a read
anywhere right after the purge goes to the store; every instance then also
drops its window when the purge is announced (``forget``). A load that read
the store before the purge cannot cache what it read afterwards: it notes the
purge count before its store read and its page is written only if the count
is unchanged.

An edit or a delete (``changed``) breaks it the same way: before the change is
acknowledged the page is dropped and the count raised (the seq key stays: it
is still the room's latest seq, which the position checks read). The count is
therefore the room's generation: a decoded window is kept with the generation
it was read under, and a warm read (one ``MGET`` of seq and count) serves it
only while both match, so no instance serves a window from before a change,
whether or not the change reached it live, and no load that read the store
before it can write its page.

State rooms have no pages, but their writes raise the same seq key before they
are acknowledged, and so does a ``GET`` of a room's state that read the store
(``loaded``): ``acknowledged`` reads it back, the newest seq any instance has
acknowledged in the room, which tells an instance whether the values it holds
are current (chat_gateway.delivery.hub, ``Hub.state_document``).

With no Redis (``memory://``) every read goes to the store: that is
``HistoryCache``; ``RedisHistoryCache`` is the cache above.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any, Protocol

import orjson
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from chat_gateway.redisio.context import RedisContext
from chat_gateway.redisio.guard import RedisGuard
from chat_gateway.redisio.pipelined import PipelinedConnection, per_key
from chat_gateway.redisio.script import Script
from chat_gateway.storage.base import MAX_PAGE, Message, Page, Store, parse_ts


class Committed(Protocol):
    """What a commit's raise needs: a stored message or a state room's write."""

    @property
    def room(self) -> str: ...

    @property
    def seq(self) -> int: ...


class CacheMetrics(Protocol):
    def cache(self, outcome: str) -> None:
        """Count one lookup: ``hit``, ``miss`` or ``error``."""


class _Uncounted:
    def cache(self, outcome: str) -> None:
        pass


log = logging.getLogger("storage.cache")

# Rooms whose decoded latest window each instance keeps (least recently read go first).
LOCAL_ROOMS = 256
# Keys per MGET when many keys are read at once over one Redis (get_many).
MGET_KEYS = 1000
# How long one instance may hold a cold key's load before others stop waiting.
LOAD_LOCK_MS = 1000
LOAD_POLL = 0.005

# A loader that lost the race for a cold key polls for the winner's page; the
# third value says whether the winner is still loading.
_POLL = """
local v = redis.call('GET', KEYS[1])
local p = redis.call('HMGET', KEYS[2], 'v', 'd')
local loading = redis.call('EXISTS', KEYS[3])
if v and p[1] == v then return {v, p[2], loading} end
return {false, false, loading}
"""

# KEYS: seq, page, purge count. The page is current when its v is the seq; the
# count read with it is the generation the page belongs to.
_READ = """
local v = redis.call('GET', KEYS[1])
if not v then return {false, false, false} end
local p = redis.call('HMGET', KEYS[2], 'v', 'd')
local g = redis.call('GET', KEYS[3])
if p[1] == v then return {v, p[2], g} end
return {v, false, g}
"""

_RAISE = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local v = tonumber(ARGV[1])
if v > cur then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
  cur = v
else
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
if ARGV[3] and v == cur then
  redis.call('HSET', KEYS[2], 'v', ARGV[1], 'd', ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[2])
end
return cur
"""


# A cold load's page write: the raise above, only if no purge happened since the
# load noted the purge count (KEYS[3], ARGV[4]) before it read the store.
_FILL = (
    """
if (redis.call('GET', KEYS[3]) or '0') ~= ARGV[4] then return -1 end
"""
    + _RAISE
)

# KEYS: page, purge count; ARGV: ttl. A message changed: a new generation, no page.
_CHANGED = """
redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: seq, page, purge count; ARGV: ttl. Counts the purge, drops the room's keys.
_PURGE = """
redis.call('INCR', KEYS[3])
redis.call('EXPIRE', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[1], KEYS[2])
return 1
"""


class HistoryCache:
    """No cache: without Redis (``memory://``) every read goes to the store.
    :class:`RedisHistoryCache` is the cache; the gateway picks one at start-up."""

    redis: Any | None = None  # the Redis the cache's commands go to (none here)

    def __init__(
        self,
        store: Store,
        *,
        prefix: str = "chat:",
        ttl: int = 3600,
        metrics: CacheMetrics | None = None,
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.ttl = ttl
        self.metrics: CacheMetrics = metrics if metrics is not None else _Uncounted()

    async def purged(self, room: str) -> None:
        """The room's history was purged in the store: no instance may serve a page
        read before that."""
        self.forget(room)

    async def changed(self, room: str) -> None:
        """A message of the room was edited or deleted in the store: as ``purged``,
        every instance's cached window of it is void."""
        self.forget(room)

    def forget(self, room: str) -> None:
        """Drop this instance's decoded window of ``room`` (a purge was announced)."""

    async def committed(self, message: Committed) -> None:
        """Record a commit; called before the write is acknowledged."""

    def raise_command(self, message: Committed) -> tuple[Any, ...]:
        """``committed`` as one Redis command, to send with others
        (chat_gateway.redisio.pipelined): only where there is a Redis."""
        raise RuntimeError("no Redis to send the raise to")

    async def queued_result(self, message: Committed, result: Any) -> None:
        """The reply of a queued raise (see :meth:`raise_command`)."""

    async def latest_seqs(self, rooms: list[str]) -> dict[str, int]:
        """Latest seqs of many rooms; a room with no message is left out."""
        return await self.store.latest_seqs(rooms) if rooms else {}

    async def acknowledged(self, room: str) -> int | None:
        """The newest seq of ``room`` whose write some instance may have acknowledged
        without this one having seen it; None when nothing records it. Without
        Redis there is one instance (``memory://``), which sees each of its writes
        as it acknowledges it: 0."""
        return 0

    async def loaded(self, room: str, seq: int) -> None:
        """A read of the store found ``room`` at ``seq``: recorded where
        :meth:`acknowledged` reads (nowhere without Redis)."""

    async def raise_behind(self, seqs: dict[str, int]) -> None:
        """Raise each cached seq that is behind ``seqs`` (the store's)."""

    async def history(
        self, room: str, *, limit: int = 50, before: int | None = None, after: int | None = None
    ) -> Page:
        return await self.store.history(room, limit=limit, before=before, after=after)

    async def get_many(self, keys: list[str]) -> list[Any]:
        """GET of each key (there are none without Redis)."""
        return [None] * len(keys)

    async def close(self) -> None:
        pass


class RedisHistoryCache(HistoryCache):
    """Read-through cache of the latest page in ``redis``, the shared Redis
    (chat_gateway.redisio.context): see the module docstring."""

    def __init__(
        self,
        store: Store,
        redis: RedisContext,
        *,
        prefix: str = "chat:",
        ttl: int = 3600,
        metrics: CacheMetrics | None = None,
    ) -> None:
        super().__init__(store, prefix=prefix, ttl=ttl, metrics=metrics)
        self.redis: Any = redis.client
        # A pipelined connection to the same Redis, for the reads.
        self.batch: PipelinedConnection | None = redis.batch
        # Skips Redis right after a failure (shared with its other users).
        self.guard: RedisGuard = redis.guard
        self._flights: dict[tuple[str, int | None], asyncio.Future[tuple[Page, Any]]] = {}
        self._dirty: dict[str, int] = {}
        self._retry: asyncio.Future[None] | None = None
        # room -> (version, generation, window): see the module docstring.
        self._local: OrderedDict[str, tuple[int, Any, Page]] = OrderedDict()
        self._unchanged: set[str] = set()  # changed rooms Redis could not be told of
        self._read = Script(self.redis, _READ)
        self._raise = Script(self.redis, _RAISE)
        self._poll = Script(self.redis, _POLL)
        self._fill = Script(self.redis, _FILL)
        self._purge = Script(self.redis, _PURGE)
        self._changed = Script(self.redis, _CHANGED)

    def _keys(self, room: str) -> list[str]:
        base = f"{self.prefix}{{{room}}}"
        return [base + ":seq", base + ":page"]

    def _purge_key(self, room: str) -> str:
        return f"{self.prefix}{{{room}}}:purged"

    async def purged(self, room: str) -> None:
        """The room's history was purged in the store: no instance may serve a page
        read before that. Raises when Redis cannot be told (the caller says so; a
        retry of the purge repeats this)."""
        self.forget(room)
        keys = self._keys(room) + [self._purge_key(room)]
        try:
            await self._purge(keys=keys, args=[self.ttl])
        except Exception as exc:
            self._failed(keys[0], exc)
            raise

    async def changed(self, room: str) -> None:
        """A message of the room was edited or deleted in the store: as ``purged``,
        every instance's cached window of it is void. Called before the change is
        acknowledged; if Redis cannot be told the room is retried in the background
        (meanwhile the guard sends reads to the store)."""
        self.forget(room)
        try:
            await self._changed(keys=self._change_keys(room), args=[self.ttl])
        except Exception as exc:
            self._failed(self._keys(room)[0], exc)
            log.warning(
                "history cache not invalidated after a change, retrying: %r",
                exc,
                extra={"room": room},
            )
            self._unchanged.add(room)
            if self._retry is None or self._retry.done():
                self._retry = asyncio.ensure_future(self._retry_dirty())

    def _change_keys(self, room: str) -> list[str]:
        return [self._keys(room)[1], self._purge_key(room)]

    def forget(self, room: str) -> None:
        """Drop this instance's decoded window of ``room`` (a purge was announced)."""
        self._local.pop(room, None)

    def _count(self, outcome: str) -> None:
        self.metrics.cache(outcome)

    async def committed(self, message: Committed) -> None:
        """Record a commit; called before the write is acknowledged.

        If Redis cannot be reached the write is still acknowledged (it is
        committed), and the raise is retried in the background until Redis
        answers, so a page cached before the outage stops being served as soon
        as this instance reaches Redis again.
        """
        keys = self._keys(message.room)
        if not self._usable(keys[0]):
            # Skipped, not failed: telling the guard would move its cooldown
            # forward on every post, and a busy instance would never try Redis
            # again. The first call after the cooldown does.
            self._retry_later(message)
            return
        try:
            await self._raise(keys=keys, args=[message.seq, self.ttl])
        except Exception as exc:
            self.not_raised(message, exc)

    def not_raised(self, message: Committed, exc: BaseException) -> None:
        """A commit whose seq could not be raised: retried in the background."""
        self._failed(self._keys(message.room)[0], exc)
        log.warning(
            "history cache not raised after commit, retrying: %r", exc, extra={"room": message.room}
        )
        self._retry_later(message)

    def _retry_later(self, message: Committed) -> None:
        self._dirty[message.room] = max(message.seq, self._dirty.get(message.room, 0))
        if self._retry is None or self._retry.done():
            self._retry = asyncio.ensure_future(self._retry_dirty())

    def _usable(self, key: str | None = None) -> bool:
        return self.guard.usable(key)

    def _failed(self, key: str | None = None, exc: BaseException | None = None) -> None:
        self.guard.failed(key, exc)

    async def _retry_dirty(self) -> None:
        delay = 0.1
        while self._dirty or self._unchanged:
            await asyncio.sleep(delay)
            for room in list(self._unchanged):
                try:
                    await self._changed(keys=self._change_keys(room), args=[self.ttl])
                except Exception:
                    delay = min(delay * 2, 2.0)
                    break
                self._unchanged.discard(room)
                self.forget(room)
            for room, seq in list(self._dirty.items()):
                try:
                    await self._raise(keys=self._keys(room), args=[seq, self.ttl])
                except Exception:
                    delay = min(delay * 2, 2.0)
                    break
                delay = 0.1  # Redis answers: what comes next goes out soon
                if self._dirty.get(room) == seq:
                    del self._dirty[room]

    async def close(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            await asyncio.gather(self._retry, return_exceptions=True)

    def raise_command(self, message: Committed) -> tuple[Any, ...]:
        """``committed`` as one Redis command, to send with others (chat_gateway.redisio.pipelined): a
        bare EVALSHA, its reply for :meth:`queued_result`."""
        return self._raise.command(self._keys(message.room), [message.seq, self.ttl])

    async def queued_result(self, message: Committed, result: Any) -> None:
        """The reply of a queued raise. A script Redis does not know (restarted,
        flushed) is loaded by raising again now; any other error is retried."""
        if isinstance(result, NoScriptError):
            await self.committed(message)
        elif isinstance(result, BaseException):
            self.not_raised(message, result)

    async def latest_seqs(self, rooms: list[str]) -> dict[str, int]:
        """Latest seqs of many rooms, from Redis in one round trip where it can. A
        room with no key (no write since its TTL) is left out; a room whose key
        cannot be read (Redis, or its shard, down) is answered by the store."""
        seqs: dict[str, int] = {}
        prefix = self.prefix
        values = await self.get_many([f"{prefix}{{{room}}}:seq" for room in rooms])
        unread = []
        for room, value in zip(rooms, values, strict=True):
            if isinstance(value, BaseException):
                log.debug("cache seq read failed: %r", value)
                unread.append(room)
            elif value is not None:
                seqs[room] = int(value)
        if unread:
            seqs.update(await self.store.latest_seqs(unread))
        return seqs

    async def acknowledged(self, room: str) -> int | None:
        """The room's seq key: raised before every write is acknowledged, by any
        instance (None: no key, no write raised it within its TTL). When Redis
        cannot be read, the store's latest seq, which holds every acknowledged write."""
        (value,) = await self.get_many([self._keys(room)[0]])
        if isinstance(value, BaseException):
            log.debug("cache seq read failed: %r", value)
            return (await self.store.latest_seqs([room])).get(room, 0)
        return None if value is None else int(value)

    async def loaded(self, room: str, seq: int) -> None:
        """Raise the room's seq key to ``seq``, read from the store (never lowered),
        so that the next reads of :meth:`acknowledged` find a key. A failure is
        only logged: the key is then missing or behind the store, never ahead."""
        keys = self._keys(room)
        if not self._usable(keys[0]):
            return
        try:
            await self._raise(keys=keys, args=[seq, self.ttl])
        except Exception as exc:
            self._failed(keys[0], exc)
            log.debug("cache seq raise after a state read failed: %r", exc)

    async def raise_behind(self, seqs: dict[str, int]) -> None:
        """Raise each room's seq key that is behind ``seqs`` (the store's): a commit
        whose raise was lost for good (its instance cut from Redis, or dead before
        the retry) would otherwise leave a page without it served as current. One
        read for all; a raise only where a key is behind. A room with no key has
        no page to serve; one whose key cannot be read waits for the next call."""
        if not seqs:
            return
        rooms = list(seqs)
        prefix = self.prefix
        values = await self.get_many([f"{prefix}{{{room}}}:seq" for room in rooms])
        for room, value in zip(rooms, values, strict=True):
            if value is None or isinstance(value, BaseException) or int(value) >= seqs[room]:
                continue
            try:
                await self._raise(keys=self._keys(room), args=[seqs[room], self.ttl])
            except Exception as exc:
                log.debug("cache seq repair failed: %r", exc)

    async def history(
        self, room: str, *, limit: int = 50, before: int | None = None, after: int | None = None
    ) -> Page:
        if before is not None or after is not None:
            return await self.store.history(room, limit=limit, before=before, after=after)
        keys = self._keys(room)
        if not self._usable(keys[0]):
            return await self.store.history(room, limit=limit)
        version: int | None = None
        generation_key = self._purge_key(room)
        try:
            held = self._local.get(room)
            if held is not None:
                raw_v, raw_g = await self._get_pair(keys[0], generation_key)
                if raw_v is not None and int(raw_v) == held[0] and _text(raw_g) == held[1]:
                    self._local.move_to_end(room)
                    self._count("hit")
                    return _window_page(held[2], limit)
            raw_v, raw_page, raw_g = await self._read(keys=keys + [generation_key])
            if raw_v:
                version = int(raw_v)
            if raw_page:
                self._count("hit")
                window = _unpack(orjson.loads(raw_page))
                if version is not None:
                    self._keep(room, version, _text(raw_g), window)
                return _window_page(window, limit)
        except Exception as exc:
            self._failed(keys[0], exc)
            log.debug("cache read failed: %r", exc)
            self._count("error")
            return await self.store.history(room, limit=limit)
        self._count("miss")
        flight = self._flights.get((room, version))
        if flight is None:
            flight = asyncio.ensure_future(self._load(room, keys))
            self._flights[(room, version)] = flight
            flight.add_done_callback(lambda _f: self._flights.pop((room, version), None))
        window, generation = await asyncio.shield(flight)
        if window.messages and generation is not _UNCACHED:
            self._keep(room, window.messages[-1].seq, generation, window)
        return _window_page(window, limit)

    async def get_many(self, keys: list[str]) -> list[Any]:
        """GET of each key, in one round trip; an exception in the place of a key that
        could not be read. Over one Redis (the batch) the keys go as MGETs of
        ``MGET_KEYS`` each: a periodic read of every held room's key costs one
        command per thousand rooms, not one per room. Over a cluster, a GET per
        key (see chat_gateway.redisio.pipelined.per_key)."""
        if self.batch is None:
            results = await per_key(
                self.redis, self.batch, self.guard, [(key, [("GET", key)]) for key in keys]
            )
            return [r if isinstance(r, BaseException) else r[0] for r in results]
        if not self._usable():
            skipped = RedisConnectionError("Redis failed moments ago")
            return [skipped] * len(keys)
        chunks = [keys[i : i + MGET_KEYS] for i in range(0, len(keys), MGET_KEYS)]
        try:
            replies = await self.batch.run([("MGET", *chunk) for chunk in chunks])
        except Exception as exc:
            replies = [exc] * len(chunks)
        values: list[Any] = []
        for chunk, reply in zip(chunks, replies, strict=True):
            if isinstance(reply, BaseException):
                self._failed()
                values += [reply] * len(chunk)
            else:
                values += reply
        return values

    async def _get_pair(self, seq_key: str, generation_key: str) -> list[Any]:
        """The warm read: seq and generation in one MGET (one slot: the same hash tag)."""
        if self.batch is not None:
            (value,) = await self.batch.run([("MGET", seq_key, generation_key)])
        else:
            (value,) = await per_key(
                self.redis, self.batch, self.guard, [(seq_key, [("MGET", seq_key, generation_key)])]
            )
            if not isinstance(value, BaseException):
                value = value[0]
        if isinstance(value, BaseException):
            raise value
        return list(value)

    def _keep(self, room: str, version: int, generation: Any, window: Page) -> None:
        self._local[room] = (version, generation, window)
        self._local.move_to_end(room)
        while len(self._local) > LOCAL_ROOMS:
            self._local.popitem(last=False)

    async def _load(self, room: str, keys: list[str]) -> tuple[Page, Any]:
        """Load the room's window from the store and cache it. Across instances one
        loads and the others wait for its page (a lock key per room), so readers
        arriving at a cold key cause one query, not one per instance. Returns the
        window and the generation it was cached under (``_UNCACHED``: not cached, so
        not to be kept here either)."""
        redis = self.redis
        lock = keys[0][: -len(":seq")] + ":load"
        try:
            leader = bool(await redis.set(lock, b"1", nx=True, px=LOAD_LOCK_MS))
        except Exception:
            leader = True
        if not leader:
            window = await self._await_leader(keys + [lock])
            if window is not None:
                return window, _UNCACHED
        try:
            purge_key = self._purge_key(room)
            try:
                purges = await redis.get(purge_key)
            except Exception:
                purges = None
            window = await self.store.history(room, limit=MAX_PAGE)
            generation: Any = _UNCACHED
            if window.messages:
                data = orjson.dumps(
                    {"m": [m.to_dict() for m in window.messages], "h": window.has_more}
                )
                try:
                    filled = await self._fill(
                        keys=keys + [purge_key],
                        args=[
                            window.messages[-1].seq,
                            self.ttl,
                            data,
                            purges.decode() if isinstance(purges, bytes) else (purges or "0"),
                        ],
                    )
                    if filled != -1 and filled == window.messages[-1].seq:
                        generation = _text(purges)
                except Exception as exc:
                    log.debug("cache fill failed: %r", exc)
            return window, generation
        finally:
            if leader:
                try:
                    await redis.delete(lock)
                except Exception:
                    pass

    async def _await_leader(self, keys: list[str]) -> Page | None:
        """The page another instance is loading, or None if it gave up or found none."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOAD_LOCK_MS / 1000
        while loop.time() < deadline:
            await asyncio.sleep(LOAD_POLL)
            try:
                _v, raw_page, loading = await self._poll(keys=keys)
            except Exception:
                return None
            if raw_page:
                return _unpack(orjson.loads(raw_page))
            if not loading:
                return None
        return None


_UNCACHED = object()  # a loaded window that was not written to Redis


def _text(value: Any) -> str | None:
    """A generation as Redis returns it (bytes, str or nil) in one comparable form."""
    return value.decode() if isinstance(value, bytes) else value


def _unpack(cached: dict[str, Any]) -> Page:
    return Page([_from_dict(m) for m in cached["m"]], bool(cached["h"]))


def _window_page(window: Page, limit: int) -> Page:
    """The latest ``limit`` messages of a cached window."""
    msgs = window.messages
    return Page(msgs[-limit:], window.has_more or limit < len(msgs))


def _from_dict(d: dict[str, Any]) -> Message:
    edited, deleted = d.get("edited_at"), d.get("deleted_at")
    mentions = d.get("mentions")
    return Message(
        d["id"],
        d["room"],
        d["seq"],
        d["author"],
        d["text"],
        parse_ts(d["created_at"]),
        d.get("version", 1),
        None if edited is None else parse_ts(edited),
        None if deleted is None else parse_ts(deleted),
        reactions=d.get("reactions"),
        reply_to=d.get("reply_to"),
        mentions=None if mentions is None else tuple(mentions),
        thread=d.get("thread"),
    )
