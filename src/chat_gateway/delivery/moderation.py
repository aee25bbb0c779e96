"""Moderation checks: every path that reads, subscribes, posts, changes or types in a
room asks here first (``Moderation.check_*``), so the rules live in one place.

The room's bans, mutes and slow mode (chat_gateway.storage.moderation) are kept
per instance in a cache, loaded from the store on a room's first use, so a
check costs no round trip. The cache is kept fresh three ways:

- a moderation action sends ``Moderated`` on the control channel
  (chat_gateway.delivery.commands): every instance forgets the room at once;
- every ``REFRESH`` seconds the rooms cached are read again, in one query per
  page of rooms, should a command have been lost;
- a refusal the cache would give is checked against the store first, so a ban
  or mute lifted on one instance is lifted at once on every other, before its
  command arrives or where it never does (a refusal costs one store read; the
  checks that pass, nearly all of them, cost none).

The cache only refuses early: the store's append refuses a banned or muted
author under the room's row lock whatever the cache says (``Restricted``), and
such a refusal makes the instance forget the room.

Slow mode takes one Redis key per (room, user) with ``SET NX PX``: the first
post within the window sets it, the others find it and wait its ``PTTL``. While
Redis is unreachable (or without Redis) the windows are kept per instance, as
the rate limiter does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

from chat_gateway.errors import ApiError
from chat_gateway.periodic import every
from chat_gateway.redisio.context import RedisContext
from chat_gateway.redisio.guard import RedisGuard
from chat_gateway.storage import Store
from chat_gateway.storage.moderation import BANNED, MUTED, Restricted, RoomModeration, now_ms

log = logging.getLogger("gateway.moderation")

REFRESH = 30.0  # seconds between reads of every cached room: the safety net
MAX_ROOMS = 50_000  # rooms cached per instance; the least recently used go first
_PAGE = 500  # rooms per refresh query


def refusal(kind: str, room: str, restriction_until: int | None = None) -> ApiError:
    """The 403 (or error frame) for a banned or muted user."""
    if kind == BANNED:
        text = f"you are banned from room {room!r}"
    else:
        text = f"you are muted in room {room!r}: you may read but not post, edit or type"
    extra: dict[str, Any] = {"room": room}
    if restriction_until is not None:
        extra["expires_in"] = round(max(0.0, (restriction_until - now_ms()) / 1000), 3)
    return ApiError(kind, text, **extra)


def restricted(exc: Restricted) -> ApiError:
    """The store's refusal as the client's error."""
    return refusal(exc.kind, exc.room)


class SlowWindows:
    """Slow mode's windows, one per (room, user), kept by this instance (no Redis).
    :class:`RedisSlowWindows` shares them across instances."""

    MAX_LOCAL = 100_000

    def __init__(self, *, prefix: str) -> None:
        self.prefix = prefix
        self._local: dict[str, float] = {}  # key -> monotonic end of its window

    def key(self, room: str, user: str) -> str:
        return f"{self.prefix}slow:{{{room}}}:{len(user)}:{user}"

    async def take(self, room: str, user: str, seconds: int) -> float:
        """Open the user's window in the room: 0 when it was closed (the post may
        go), else the seconds until it closes."""
        return self._take_local(self.key(room, user), seconds)

    def _take_local(self, key: str, seconds: int) -> float:
        now = time.monotonic()
        end = self._local.get(key)
        if end is not None and end > now:
            return end - now
        self._local[key] = now + seconds
        if len(self._local) > self.MAX_LOCAL:
            for k, e in list(self._local.items()):
                if e <= now:
                    del self._local[k]
        return 0.0


class RedisSlowWindows(SlowWindows):
    """Slow mode's windows as Redis keys shared by every instance, or this
    instance's own while Redis is unreachable."""

    def __init__(self, redis: Any, *, prefix: str, guard: RedisGuard) -> None:
        super().__init__(prefix=prefix)
        self.redis = redis
        self.guard = guard
        self._fallback = False

    async def take(self, room: str, user: str, seconds: int) -> float:
        key = self.key(room, user)
        if self.guard.usable(key):
            try:
                if await self.redis.set(key, b"1", nx=True, px=seconds * 1000):
                    self._set_fallback(False)
                    return 0.0
                left = await self.redis.pttl(key)
                self._set_fallback(False)
                return max(0.001, int(left) / 1000) if int(left) > 0 else 0.001
            except Exception as exc:
                self.guard.failed(key, exc)
                self._set_fallback(True, exc)
        return self._take_local(key, seconds)

    def _set_fallback(self, on: bool, why: object = None) -> None:
        if on != self._fallback:
            if on:
                log.warning("slow mode: Redis unreachable (%r); windows kept per instance", why)
            else:
                log.warning("slow mode: Redis reachable again; windows shared")
        self._fallback = on


class Moderation:
    """The moderation checks, over a per-instance cache of each room's restrictions."""

    def __init__(
        self,
        store: Store,
        redis: RedisContext | None = None,
        *,
        prefix: str = "chat:",
        refresh: float = REFRESH,
    ) -> None:
        self.store = store
        self.slow = (
            SlowWindows(prefix=prefix)
            if redis is None
            else RedisSlowWindows(redis.client, prefix=prefix, guard=redis.guard)
        )
        self.refresh_interval = refresh
        # room -> (state, monotonic time it was read)
        self._rooms: OrderedDict[str, tuple[RoomModeration, float]] = OrderedDict()
        # room -> times forgotten, so that a read begun before a forget is not kept
        self._generation: dict[str, int] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = every(self.refresh_interval, self.refresh, "moderation refresh")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    # -- the cache -------------------------------------------------------------------

    async def state(self, room: str) -> RoomModeration:
        """The room's restrictions: cached, else read from the store (and cached)."""
        held = self._rooms.get(room)
        if held is not None:
            self._rooms.move_to_end(room)
            return held[0]
        return await self._load(room)

    async def _load(self, room: str) -> RoomModeration:
        generation = self._generation.get(room, 0)
        state = (await self.store.room_moderations([room]))[room]
        if self._generation.get(room, 0) == generation:
            self._keep(state, time.monotonic())
        return state

    def _keep(self, state: RoomModeration, at: float) -> None:
        self._rooms[state.room] = (state, at)
        self._rooms.move_to_end(state.room)
        while len(self._rooms) > MAX_ROOMS:
            old, _ = self._rooms.popitem(last=False)
            self._generation.pop(old, None)

    def forget(self, room: str) -> None:
        """The room changed (a moderation action on some instance): read it again on
        its next use."""
        self._rooms.pop(room, None)
        self._generation[room] = self._generation.get(room, 0) + 1

    async def refresh(self) -> None:
        """Read every cached room again (the safety net for a lost command)."""
        rooms = list(self._rooms)
        for i in range(0, len(rooms), _PAGE):
            page = rooms[i : i + _PAGE]
            generations = {room: self._generation.get(room, 0) for room in page}
            at = time.monotonic()
            for room, state in (await self.store.room_moderations(page)).items():
                if room in self._rooms and self._generation.get(room, 0) == generations[room]:
                    self._rooms[room] = (state, at)

    async def _confirmed(self, room: str, refused: bool) -> RoomModeration:
        """The room's state; when it would refuse, read from the store again first (a
        lift on another instance whose command has not arrived, or was lost)."""
        held = self._rooms.get(room)
        if refused and held is not None:
            self.forget(room)
            return await self._load(room)
        return held[0] if held is not None else await self._load(room)

    # -- the checks ------------------------------------------------------------------

    async def check_read(self, room: str, user: str | None) -> None:
        """Refuse (403 ``banned``) a read of ``room`` (history, read state, SSE, WS
        subscribe) by a banned user. ``user`` None: nobody known to check."""
        if user is None:
            return
        state = await self.state(room)
        if state.ban(user, now_ms()) is None:
            return
        state = await self._confirmed(room, True)
        ban = state.ban(user, now_ms())
        if ban is not None:
            raise refusal(BANNED, room, ban.until_ms)

    check_subscribe = check_read

    async def check_post(self, room: str, user: str, *, moderator: bool = False) -> None:
        """Refuse a post by a banned or muted user (403 ``banned`` / ``muted``), then
        take the user's slow-mode window (429 ``slow_mode``) unless ``moderator``."""
        await self._check_restricted(room, user, mute=True)
        state = await self.state(room)
        if state.slow_mode and not moderator:
            wait = await self.slow.take(room, user, state.slow_mode)
            if wait > 0:
                raise ApiError(
                    "slow_mode",
                    f"slow mode is on in room {room!r}: one post every "
                    f"{state.slow_mode} s; retry in {wait:.1f} s",
                    headers={"Retry-After": str(max(1, int(wait + 0.999)))},
                    room=room,
                    slow_mode=state.slow_mode,
                    retry_after=round(wait, 3),
                )

    async def check_change(self, room: str, user: str | None, *, edit: bool) -> None:
        """Refuse a user's change of their own message: none while banned, no edit
        while muted. ``user`` None: a moderator or an API key, never refused."""
        if user is not None:
            await self._check_restricted(room, user, mute=edit)

    async def check_typing(self, room: str, user: str) -> None:
        """Refuse typing by a banned or muted user."""
        await self._check_restricted(room, user, mute=True)

    async def _check_restricted(self, room: str, user: str, *, mute: bool) -> None:
        at = now_ms()
        state = await self.state(room)
        if state.ban(user, at) is None and not (mute and state.mute(user, at) is not None):
            return
        state = await self._confirmed(room, True)
        at = now_ms()
        ban = state.ban(user, at)
        if ban is not None:
            raise refusal(BANNED, room, ban.until_ms)
        muted = state.mute(user, at) if mute else None
        if muted is not None:
            raise refusal(MUTED, room, muted.until_ms)

    async def excluded(self, user: str | None) -> tuple[str, ...]:
        """The rooms a search by ``user`` leaves out: those where they are banned."""
        if user is None:
            return ()
        return tuple(await self.store.banned_rooms(user))

    def store_refused(self, exc: Restricted) -> ApiError:
        """The store refused what the cache let through: the cache is behind."""
        self.forget(exc.room)
        return restricted(exc)
