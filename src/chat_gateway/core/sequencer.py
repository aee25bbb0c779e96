"""A room's sequencer, without I/O: what arrives goes in, deliveries come out in commit order.

The rules of docs/delivery.md for one room on one instance, apart from the event
loop, the broker and the store (as websockets' ``protocol.py`` is apart from its
sockets). The hub (:mod:`chat_gateway.delivery.hub`) is the shell around it: it
feeds in what arrives and runs what the sequencer asks for.

In, each an event:

- ``live_message(seq, created_ms, changes, body)``: a live message (``changes``:
  the room's change count at its commit, None from a v1 payload);
- ``live_change(number, after_seq, body)``: a live edit or delete;
- ``fill_page(...)`` / ``changes_page(...)``: a page the store answered to a fill
  the sequencer asked for, and ``fill_done()`` / ``changes_fill_done()`` when
  that fill ends, however it ends;
- ``timer_fired(timer)``: a timer the sequencer armed is due.

Out, through the ``shell`` handed to the constructor (:class:`Shell`: the hub's
``Room``, one object for its six methods, so a held room costs no closures):

- ``deliver(seq, created_ms, changes, body)`` and ``deliver_change(number,
  after_seq, body)``: the room's stream, each message and change once, in commit
  order;
- ``skip_changes(previous, to)``: change numbers up to ``to`` will never be read
  (retention or a purge removed their messages); the room moves past them;
- ``schedule(timer, delay)``: arm ``timer`` to fire in ``delay`` seconds, or
  disarm it with None;
- ``fill()`` / ``fill_changes()``: start reading the store after the room's
  position; the shell reads pages in turn (``fill_next`` gives where from) until
  a page call answers False.

The rules: the next message goes once the room has delivered the changes
committed before it; the next change goes once the room has delivered the
messages committed before it (its ``after_seq``). Anything else waits: a gap
waits ``gap_wait`` seconds, then is read from the store. Live arrivals at or
below the position are repeats and dropped; past ``max_pending`` held ones the
held ones are dropped and read from the store instead.

:func:`merge` is the one interleaving of a page of messages with a page of
changes, used by fills here and by each subscriber's catch-up in the hub.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Generic, Protocol, TypeVar


class StoredMessage(Protocol):
    """A message as the store answers it (``chat_gateway.storage.Message``)."""

    @property
    def seq(self) -> int: ...

    @property
    def created_ms(self) -> int: ...

    def to_json(self) -> bytes: ...


class StoredChange(Protocol):
    """A change as the store answers it (``chat_gateway.storage.Change``)."""

    @property
    def change(self) -> int: ...

    @property
    def after_seq(self) -> int: ...

    @property
    def message(self) -> StoredMessage: ...

    def body(self) -> bytes: ...


M = TypeVar("M", bound=StoredMessage)
C = TypeVar("C", bound=StoredChange)

Clock = Callable[[], float]


class Timer(enum.Enum):
    """The sequencer's two timers."""

    GAP = "gap"  # messages held behind a missing one
    CHANGE = "change"  # changes held behind a missing one, or behind messages


class Shell(Protocol):
    """What a sequencer asks of the room that holds it (the hub's, in production):
    one object rather than a callable each, so an idle room costs no closures."""

    def deliver(self, seq: int, created_ms: int, changes: int | None, body: bytes) -> None:
        """Hand message ``seq`` to the room's subscribers, in its turn."""

    def deliver_change(self, change: int, after_seq: int, body: bytes) -> None:
        """Hand change ``change`` to the room's subscribers, in its turn."""

    def skip_changes(self, previous: int, to: int) -> None:
        """Change numbers after ``previous`` up to ``to`` will never be read."""

    def schedule(self, timer: Timer, delay: float | None) -> None:
        """Arm ``timer`` to fire in ``delay`` seconds (None: disarm it)."""

    def fill(self) -> None:
        """Start reading messages from the store (``fill_next`` / ``fill_page``)."""

    def fill_changes(self) -> None:
        """Start reading changes from the store (``changes_next`` / ``changes_page``)."""


# How long a fill that left something held waits before the next (seconds, at least).
REFILL_WAIT = 0.5

_NONE: tuple[()] = ()


class Merged(Generic[M, C]):
    """A page of messages and a page of changes in commit order.

    ``steps``: each message taken, with the changes committed just before it
    (after the one before). ``rest``: the changes after the last message taken,
    committed after it or read with no message. ``bounded``: the change page was
    full, so messages after its last change were left for the next read (changes
    committed before them may not have been read yet)."""

    __slots__ = ("steps", "rest", "bounded")

    def __init__(
        self, steps: list[tuple[Sequence[C], M]], rest: Sequence[C], bounded: bool
    ) -> None:
        self.steps = steps
        self.rest = rest
        self.bounded = bounded


def merge(messages: Sequence[M], changes: Sequence[C], *, page_size: int) -> Merged[M, C]:
    """Interleave ``messages`` (by seq) and ``changes`` (by number) read from the
    store, ``changes`` read after ``messages`` and at most ``page_size`` of them.

    A change goes right after message ``after_seq``. When the change page is full,
    messages past its last change's ``after_seq`` are left out: a change committed
    before them may be on the next page."""
    bound = changes[-1].after_seq if len(changes) >= page_size else None
    steps: list[tuple[Sequence[C], M]] = []
    taken = 0
    count = len(changes)
    for msg in messages:
        if bound is not None and msg.seq > bound:
            break
        end = taken
        while end < count and changes[end].after_seq < msg.seq:
            end += 1
        steps.append((changes[taken:end] if end > taken else _NONE, msg))
        taken = end
    return Merged(steps, changes[taken:] if taken else changes, bound is not None)


class Sequencer:
    """One room's position, what waits for its turn, and what to ask the shell for.

    ``seq`` is the last message delivered (None until ``start``), ``change`` the
    last change delivered. Every key held in ``_pending`` is above ``seq`` and
    every key in ``_cpending`` above ``change`` once started, so each event costs
    O(1) amortised."""

    __slots__ = (
        "seq",
        "change",
        "open",
        "filling",
        "filling_changes",
        "_pending",
        "_cpending",
        "_fill_again",
        "_changes_again",
        "_due",
        "_shell",
        "_clock",
        "_gap_wait",
        "_page_size",
        "_max_pending",
    )

    def __init__(
        self,
        shell: Shell,
        *,
        clock: Clock,
        gap_wait: float,
        page_size: int,
        max_pending: int,
    ) -> None:
        self.seq: int | None = None
        self.change = 0
        self.open = True
        self.filling = False  # a message fill runs (the shell's task)
        self.filling_changes = False  # a change fill runs
        # seq -> (created_ms, the room's change count at its commit or None, message)
        self._pending: dict[int, tuple[int, int | None, bytes]] = {}
        self._cpending: dict[int, tuple[int, bytes]] = {}  # change -> (after_seq, message)
        self._fill_again = False
        self._changes_again = False
        self._due: dict[Timer, float] = {}  # armed timers, by when they are due
        self._shell = shell
        self._clock = clock
        self._gap_wait = gap_wait
        self._page_size = page_size
        self._max_pending = max_pending

    # -- questions ----------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Messages and changes held for their turn."""
        return len(self._pending) + len(self._cpending)

    def due(self, timer: Timer) -> float | None:
        """When ``timer`` fires (the clock's time), or None when it is not armed."""
        return self._due.get(timer)

    # -- events -------------------------------------------------------------------

    def start(self, seq: int, change: int) -> None:
        """The room's position, read from the store after its channel was
        subscribed: what arrived meanwhile at or below it is dropped, the rest
        goes in turn."""
        self.seq = seq
        self.change = change
        for old in [s for s in self._pending if s <= seq]:
            del self._pending[old]
        for old in [k for k in self._cpending if k <= change]:
            del self._cpending[old]
        self._drain()

    def close(self) -> None:
        """The room is let go: timers disarmed, nothing more is asked for."""
        self.open = False
        for timer in list(self._due):
            self._disarm(timer)

    def live_message(self, seq: int, created_ms: int, changes: int | None, body: bytes) -> None:
        """A live message."""
        last = self.seq
        if last is not None:
            if seq <= last:
                return  # already delivered (a fill got there first)
            if (
                seq == last + 1
                and not self._pending
                and (changes is None or changes <= self.change)
            ):
                # Its turn, and nothing held: no need to hold it first.
                self.seq = seq
                self._shell.deliver(seq, created_ms, changes, body)
                if self._cpending or self._due:
                    self._drain()
                return
        if len(self._pending) >= self._max_pending:
            self._pending.clear()
            if last is not None:
                self.fill()
            return
        self._pending[seq] = (created_ms, changes, body)
        if last is not None:
            self._drain()

    def live_change(self, change: int, after_seq: int, body: bytes) -> None:
        """A live edit or delete."""
        if self.seq is None:  # joining: sequenced once the position is read
            self._cpending[change] = (after_seq, body)
            return
        if change <= self.change:
            return
        if len(self._cpending) >= self._max_pending:
            self._cpending.clear()
            self.fill_changes()
            return
        self._cpending[change] = (after_seq, body)
        self._drain()

    def timer_fired(self, timer: Timer) -> bool:
        """``timer`` is due. True when it started reading its gap from the store."""
        if self._due.pop(timer, None) is None or not self.open:
            return False  # disarmed meanwhile
        if timer is Timer.GAP:
            if self._pending:
                self.fill()
                return True
            return False
        if not self._cpending:
            return False
        waiting = self._cpending.get(self.change + 1)
        if waiting is not None and self.seq is not None and waiting[0] > self.seq:
            self.fill()  # the messages before it were lost or are late
            self._arm(Timer.CHANGE, max(self._gap_wait, REFILL_WAIT))
            return False
        self.fill_changes()
        return True

    # -- fills: the store read after the position ----------------------------------

    def fill(self) -> None:
        """Read the store after the room's position (the shell's task, in pages)."""
        if self.filling:
            self._fill_again = True
            return
        self.filling = True
        self._shell.fill()

    def fill_next(self) -> int:
        """A fill reads its next page: the seq to read after."""
        assert self.seq is not None, "a fill runs only once the room's position is known"
        self._fill_again = False
        return self.seq

    def fill_page(
        self,
        messages: Sequence[StoredMessage],
        has_more: bool,
        changes: Sequence[StoredChange],
        known: int,
    ) -> bool:
        """Messages read after the position, then the changes after ``known`` (the
        room's last change when they were read; none read when there was no
        message). Each message waits for the changes committed before it, then
        everything goes in turn. False when the fill is done."""
        seq = self.seq
        assert seq is not None
        self._take_changes(changes)
        position = (seq, self.change)
        merged = merge(messages, changes, page_size=self._page_size)
        before = known
        pending = self._pending
        for preceding, msg in merged.steps:
            if preceding:
                before = preceding[-1].change
            if msg.seq > seq:
                pending[msg.seq] = (msg.created_ms, before, msg.to_json())
        self._drain()
        if (self.seq, self.change) == position and not self._fill_again and self.waiting:
            return False  # nothing more could go: the timers come back for what is held
        # (Nothing held and no progress: the page went live meanwhile; read on.)
        return has_more or merged.bounded or self._fill_again

    def state_page(self, entries: Sequence[StoredMessage], latest: int) -> None:
        """A state room's fill: the current entries written after the position,
        ascending by seq, and ``latest``, the room's last seq, as one read saw them.

        A state room keeps each key's newest write only, so seqs are missing from
        what the store answers: a key written again later (its older write is
        replaced by the newer entry, which is here) or a purged tombstone. Seqs
        commit in order under the room's lock, so every seq up to ``latest`` that
        the read does not show will never be read: the position moves past it and
        what is held below an entry is dropped (an older value of some key whose
        newest value this page delivers), instead of waiting for it forever."""
        assert self.seq is not None
        pending = self._pending
        for entry in entries:
            if entry.seq <= self.seq:
                continue
            for old in [s for s in pending if s < entry.seq]:
                del pending[old]
            self.seq = entry.seq - 1
            pending[entry.seq] = (entry.created_ms, None, entry.to_json())
            self._drain()
        if latest > self.seq:
            for old in [s for s in pending if s <= latest]:
                del pending[old]
            self.seq = latest
            self._drain()

    def fill_done(self) -> None:
        """The fill ended (done, failed or cancelled)."""
        self.filling = False
        if self._pending and Timer.GAP not in self._due and self.open:
            self._arm(Timer.GAP, max(self._gap_wait, REFILL_WAIT))

    def fill_changes(self) -> None:
        """Read the change log after the room's last change (the shell's task)."""
        if self.filling_changes:
            self._changes_again = True
            return
        self.filling_changes = True
        self._shell.fill_changes()

    def changes_next(self) -> int:
        """A change fill reads its next page: the number to read after."""
        self._changes_again = False
        return self.change

    def changes_page(self, changes: Sequence[StoredChange]) -> bool:
        """Changes read after the room's last change. False when the fill is done."""
        self._take_changes(changes)
        self._drain()
        if len(changes) < self._page_size and not self._changes_again:
            return False
        # Waiting for messages: the timer comes back.
        return self.change + 1 not in self._cpending

    def changes_fill_done(self) -> None:
        """The change fill ended (done, failed or cancelled)."""
        self.filling_changes = False
        if self._cpending and Timer.CHANGE not in self._due and self.open:
            self._arm(Timer.CHANGE, max(self._gap_wait, REFILL_WAIT))

    # -- inside -------------------------------------------------------------------

    def _take_changes(self, changes: Sequence[StoredChange]) -> None:
        """Changes read from the store join the held ones."""
        cpending = self._cpending
        if changes and changes[0].change > self.change + 1 and self.change + 1 not in cpending:
            # Numbers commit in order, so a number missing below a stored one is
            # a change whose message retention or a purge removed: skip it.
            to = changes[0].change - 1
            self._shell.skip_changes(self.change, to)
            self.change = to
            for old in [k for k in cpending if k <= to]:
                del cpending[old]
        for change in changes:
            if change.change > self.change:
                cpending[change.change] = (change.after_seq, change.body())

    def _drain(self) -> None:
        """Deliver what is next in commit order, messages and changes interleaved."""
        seq = self.seq
        assert seq is not None
        pending, cpending = self._pending, self._cpending
        while True:
            message = pending.get(seq + 1)
            if message is not None and (message[1] is None or message[1] <= self.change):
                del pending[seq + 1]
                seq = self.seq = seq + 1
                self._shell.deliver(seq, *message)
                continue
            change = cpending.get(self.change + 1)
            if change is not None and change[0] <= seq:
                number = self.change = self.change + 1
                del cpending[number]
                self._shell.deliver_change(number, *change)
                continue
            break
        due = self._due
        if pending:
            if Timer.GAP not in due and not self.filling:
                # A seq ahead of the next one, or the next one waiting for a change
                # not here: wait briefly for the missing ones.
                self._arm(Timer.GAP, self._gap_wait)
        elif Timer.GAP in due:
            self._disarm(Timer.GAP)
        if cpending:
            if Timer.CHANGE not in due and not self.filling_changes:
                # A change ahead of the next number, or waiting for messages not
                # yet here: wait briefly, then read the store.
                self._arm(Timer.CHANGE, self._gap_wait)
        elif Timer.CHANGE in due:
            self._disarm(Timer.CHANGE)

    def _arm(self, timer: Timer, delay: float) -> None:
        self._due[timer] = self._clock() + delay
        self._shell.schedule(timer, delay)

    def _disarm(self, timer: Timer) -> None:
        del self._due[timer]
        self._shell.schedule(timer, None)
