"""Moderation records: a room's bans, mutes and slow mode, and its moderation log.

A room's restrictions live on its ``rooms`` row (the row every append locks), so
the append itself refuses a banned or muted author under the same lock as the
ban's commit: whatever any cache says, nothing is stored for a user after the
answer to their ban. An expired restriction stays on the row until the room's
next moderation write prunes it; every check compares its ``until`` with the
clock, so it ends on time on every instance with no job.

The pure part is here: the records, their stored JSON, and :func:`apply`, which
both stores use to turn an action into the room's next state and its log entry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from chat_gateway.storage.records import format_ts, new_id

BANNED, UNBANNED, MUTED, UNMUTED, SLOW_MODE = (
    "banned",
    "unbanned",
    "muted",
    "unmuted",
    "slow_mode",
)
ACTIONS = (BANNED, UNBANNED, MUTED, UNMUTED, SLOW_MODE)


def now_ms() -> int:
    return int(time.time() * 1000)


class Restricted(Exception):
    """An append or change refused by the store: the author is banned (``kind``
    ``banned``) or muted (``muted``) in the room."""

    def __init__(self, kind: str, room: str, user: str) -> None:
        super().__init__(f"{user!r} is {kind} in room {room!r}")
        self.kind = kind
        self.room = room
        self.user = user


@dataclass(frozen=True, slots=True)
class Restriction:
    """One ban or mute: until when (epoch ms; None: until lifted), why, by whom, when."""

    user: str
    until_ms: int | None
    reason: str
    by: str
    at_ms: int

    def active(self, at_ms: int) -> bool:
        return self.until_ms is None or self.until_ms > at_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "user": self.user,
            "reason": self.reason,
            "by": self.by,
            "created_at": format_ts(self.at_ms),
            "expires_at": None if self.until_ms is None else format_ts(self.until_ms),
        }

    def stored(self) -> dict[str, Any]:
        return {"until": self.until_ms, "reason": self.reason, "by": self.by, "at": self.at_ms}


def _restrictions(raw: str | bytes | None) -> dict[str, Restriction]:
    if not raw:
        return {}
    data = orjson.loads(raw)
    return {
        user: Restriction(
            user, e.get("until"), e.get("reason", ""), e.get("by", ""), e.get("at", 0)
        )
        for user, e in data.items()
    }


def _stored(restrictions: dict[str, Restriction]) -> str:
    return orjson.dumps({u: r.stored() for u, r in restrictions.items()}).decode()


@dataclass(frozen=True, slots=True)
class RoomModeration:
    """A room's restrictions and slow mode (seconds; 0: off) as stored."""

    room: str
    bans: dict[str, Restriction] = field(default_factory=dict)
    mutes: dict[str, Restriction] = field(default_factory=dict)
    slow_mode: int = 0

    @classmethod
    def of_row(
        cls, room: str, banned: str | bytes | None, muted: str | bytes | None, slow: int | None
    ) -> RoomModeration:
        return cls(room, _restrictions(banned), _restrictions(muted), int(slow or 0))

    def stored(self) -> tuple[str, str, int]:
        """(banned JSON, muted JSON, slow mode) for the room's row."""
        return _stored(self.bans), _stored(self.mutes), self.slow_mode

    def ban(self, user: str | None, at_ms: int) -> Restriction | None:
        found = None if user is None else self.bans.get(user)
        return found if found is not None and found.active(at_ms) else None

    def mute(self, user: str | None, at_ms: int) -> Restriction | None:
        found = None if user is None else self.mutes.get(user)
        return found if found is not None and found.active(at_ms) else None

    def refusal(self, user: str | None, at_ms: int) -> str | None:
        """Why ``user`` may not post now: ``banned``, ``muted``, or None."""
        if self.ban(user, at_ms) is not None:
            return BANNED
        if self.mute(user, at_ms) is not None:
            return MUTED
        return None

    def active(self, kind: str, at_ms: int) -> list[Restriction]:
        """The active bans (``banned``) or mutes (``muted``), by user."""
        table = self.bans if kind == BANNED else self.mutes
        return sorted((r for r in table.values() if r.active(at_ms)), key=lambda r: r.user)


@dataclass(frozen=True, slots=True)
class Action:
    """A moderator's request: ``action`` one of :data:`ACTIONS`; ``user`` for all but
    slow mode; ``duration`` seconds for a ban or mute (None: until lifted)."""

    action: str
    by: str
    user: str | None = None
    reason: str = ""
    duration: int | None = None
    slow_mode: int | None = None

    def until(self, at_ms: int) -> int | None:
        """When a ban or mute made at ``at_ms`` ends (None: until lifted, or no end)."""
        if self.duration is None or self.action not in (BANNED, MUTED):
            return None
        return at_ms + self.duration * 1000


@dataclass(frozen=True, slots=True)
class ModerationEntry:
    """One line of a room's moderation log."""

    id: int
    room: str
    action: str
    user: str | None
    by: str
    reason: str
    until_ms: int | None
    slow_mode: int | None
    at_ms: int

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "room": self.room,
            "action": self.action,
            "by": self.by,
            "created_at": format_ts(self.at_ms),
        }
        if self.action == SLOW_MODE:
            d["slow_mode"] = self.slow_mode
        else:
            d["user"] = self.user
            d["reason"] = self.reason
        if self.action in (BANNED, MUTED):
            d["expires_at"] = None if self.until_ms is None else format_ts(self.until_ms)
        return d

    def event(self) -> tuple[str, str, str]:
        """The webhook event: (event id, ``moderation.<action>``, data JSON)."""
        return (
            "evt_" + new_id(self.at_ms),
            "moderation." + self.action,
            orjson.dumps(self.to_dict()).decode(),
        )


def apply(state: RoomModeration, action: Action, at_ms: int) -> RoomModeration | None:
    """The room's state after ``action`` (expired restrictions pruned), or None when
    it changes nothing to record: lifting a ban or mute the user does not have."""
    bans = {u: r for u, r in state.bans.items() if r.active(at_ms)}
    mutes = {u: r for u, r in state.mutes.items() if r.active(at_ms)}
    kind = action.action
    if kind == SLOW_MODE:
        return RoomModeration(state.room, bans, mutes, action.slow_mode or 0)
    user = action.user or ""
    table = bans if kind in (BANNED, UNBANNED) else mutes
    if kind in (UNBANNED, UNMUTED):
        if table.pop(user, None) is None:
            return None
    else:
        table[user] = Restriction(user, action.until(at_ms), action.reason, action.by, at_ms)
    return replace(state, bans=bans, mutes=mutes)


def entry(room: str, action: Action, at_ms: int, entry_id: int = 0) -> ModerationEntry:
    """The log entry of ``action`` (``entry_id`` 0 until the store numbers it)."""
    return ModerationEntry(
        entry_id,
        room,
        action.action,
        action.user,
        action.by,
        action.reason,
        action.until(at_ms),
        action.slow_mode if action.action == SLOW_MODE else None,
        at_ms,
    )


def log_row(e: ModerationEntry) -> tuple[Any, ...]:
    """The entry's columns after its id, as both stores insert them."""
    return (e.room, e.action, e.user, e.by, e.reason, e.until_ms, e.slow_mode)


def check_change(state: RoomModeration, author: str | None, *, edit: bool, at_ms: int) -> None:
    """Refuse (``Restricted``) an author's change of their own message: none while
    banned, no edit while muted (a muted user may still delete). ``author`` None: a
    moderator's or API key's change, never refused."""
    if author is None:
        return
    if state.ban(author, at_ms) is not None:
        raise Restricted(BANNED, state.room, author)
    if edit and state.mute(author, at_ms) is not None:
        raise Restricted(MUTED, state.room, author)


def check_append(state: RoomModeration, author: str, at_ms: int) -> None:
    """Refuse (``Restricted``) a post by a banned or muted author."""
    kind = state.refusal(author, at_ms)
    if kind is not None:
        raise Restricted(kind, state.room, author)
