"""The webhook outbox: events waiting for their receivers, in the message database.

A stored message's ``message.created`` event is written by the statement that
commits the message (see ``Store.write_outbox``), and an edit's or delete's
``message.updated`` / ``message.deleted`` by the change's transaction, one row
per receiver, so a committed message or change always has its event and an
event never exists without its commit. Each row then lives on its own: pending, delivered or dead.

Contract every implementation keeps:

- The rows of one receiver and one room form a queue in commit order (``pos``:
  the room's seq plus its change count at the commit, so a message's edits and
  deletes queue after it and between the messages they were committed between);
  only its head (the pending row with the lowest ``pos``) is ever handed out, so
  a later event is never sent before an earlier one succeeded or died.
- A subject's queue (``user.online``..., queue ``@kind/name``, ``pos`` its
  transition number) is written by whichever instance decided each transition,
  so transition ``n + 1`` can be written before ``n``. Its head at ``pos`` p > 1 is
  handed out only once the queue holds a row at p - 1 (any receiver, any state)
  or the head is ``SUBJECT_WAIT`` seconds old (the writer of p - 1 died between
  the decision and the write). Pruning keeps a subject queue's row until the
  row after it is written.
- ``claim`` leases heads that are due for ``lease`` seconds: while the lease
  runs nobody else gets that row (on Postgres the claim locks rows with
  ``FOR UPDATE SKIP LOCKED``, so instances claiming at once never share one).
  The holder ``renew``s the leases of its attempts in flight, so a lease is
  short and outlives its holder by at most its length: one that runs out (its
  holder died or lost the database) makes the row claimable again.
- A row's ``data`` is the event as committed, except that the store empties its
  ``text`` (and sets ``deleted_at``) when the message is deleted, purged or
  removed by retention, in that removal's transaction (see ``storage.base``).
- Every outcome (delivered, retry, dead) is one short transaction; rows only
  leave the table when delivered and older than the pruning cutoff: pending and
  dead rows stay until delivered or replayed.
- Failures raise ``StoreUnavailable``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

PENDING, DELIVERED, DEAD = 0, 1, 2

# Seconds a subject queue's head waits for its missing predecessor (see above).
SUBJECT_WAIT = 5.0


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A receiver URL; ``disabled_reason`` is set once it answered 410 Gone."""

    id: int
    url: str
    disabled_reason: str | None = None

    @property
    def disabled(self) -> bool:
        return self.disabled_reason is not None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One event for one receiver, leased for one attempt."""

    id: int
    endpoint_id: int
    event_id: str  # the webhook-id header: the same for every attempt of the event
    type: str
    room: str
    seq: int
    data: str  # the event's ``data`` object, JSON
    created_ms: int
    attempts: int  # attempts made before this one


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: int
    endpoint_id: int
    event_id: str
    type: str
    room: str
    seq: int
    data: str
    created_ms: int
    attempts: int
    last_status: int | None
    last_error: str | None
    dead_ms: int


@dataclass(frozen=True, slots=True)
class Backlog:
    endpoint_id: int
    pending: int
    oldest_ms: int | None  # commit time of the oldest pending event


class Outbox(ABC):
    """Operations on the outbox tables. Constructing one does no I/O."""

    @abstractmethod
    async def register(self, urls: list[str]) -> list[Endpoint]:
        """Make sure every URL has its endpoint row; return them in this order."""

    @abstractmethod
    async def endpoints(self) -> list[Endpoint]:
        """Every endpoint row, with its disabled state as stored now."""

    @abstractmethod
    async def disable(self, endpoint_id: int, reason: str) -> None: ...

    @abstractmethod
    async def enable(self, endpoint_id: int) -> None: ...

    @abstractmethod
    async def enqueue(
        self,
        endpoint_ids: list[int],
        event_id: str,
        type_: str,
        queue: str,
        pos: int,
        data: str,
        ms: int,
    ) -> None:
        """Write an event that belongs to no message (``user.online``...), one row per
        receiver, in the queue ``queue`` at ``pos``: ``queue`` is never a room name
        (it starts with ``@``), so these queues never hold up a room's messages."""

    @abstractmethod
    async def claim(self, endpoint_ids: list[int], limit: int, lease: float) -> list[Delivery]:
        """Lease at most ``limit`` due queue heads of these endpoints."""

    @abstractmethod
    async def delivered(
        self, delivery: Delivery, status: int, *, lease: float, chain: bool
    ) -> Delivery | None:
        """Mark a delivery done; with ``chain``, lease and return the next head of
        its queue if that one is due (the queue drains without waiting for a claim)."""

    @abstractmethod
    async def retry(self, delivery: Delivery, delay: float, status: int | None, error: str) -> None:
        """Count a failed attempt; the row is due again in ``delay`` seconds."""

    @abstractmethod
    async def dead(self, delivery: Delivery, status: int | None, error: str) -> None:
        """Count a failed attempt and give the event up: a dead letter."""

    @abstractmethod
    async def renew(self, ids: list[int], lease: float) -> None:
        """Extend to ``lease`` seconds from now the leases still held on these rows
        (pending and leased: one whose outcome was recorded meanwhile is left alone)."""

    @abstractmethod
    async def release(self, delivery: Delivery) -> None:
        """Give a lease back unused (nothing was sent), due at once."""

    @abstractmethod
    async def backlog(self) -> list[Backlog]:
        """Pending events per endpoint."""

    @abstractmethod
    async def dead_letters(
        self, *, limit: int, before: int | None = None, endpoint_id: int | None = None
    ) -> list[DeadLetter]:
        """Dead letters, newest first (by id), below ``before`` when given."""

    @abstractmethod
    async def replay(
        self,
        *,
        ids: list[int] | None = None,
        since_ms: int | None = None,
        until_ms: int | None = None,
        endpoint_id: int | None = None,
    ) -> int:
        """Make events pending again, due now, their attempts reset: the dead letters
        ``ids``, or every delivered or dead event committed in [since_ms, until_ms).
        Return how many."""

    @abstractmethod
    async def prune(self, cutoff_ms: int, limit: int) -> int:
        """Delete at most ``limit`` delivered events committed before ``cutoff_ms``."""
