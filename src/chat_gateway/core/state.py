"""A state room's values as an instance holds them, without I/O.

When an instance holds a state room (a subscriber is there), the hub keeps every
key's newest entry in a :class:`LiveState`: read from the store once when the room
is opened (under the room's lock, so concurrent subscribers share that one read),
then kept current by each write the room's sequencer delivers. A subscriber's
snapshot, a resume's "every key written after ``since``" and the answer of a
``GET`` of the room's state (when the room's position is that of every write
acknowledged, ``Hub.state_document``) come from here, so a thousand dashboards
connecting at once cost one store read per instance; the encoded snapshot is kept
per transport (and for ``GET``) until the next write.

The values are exact at the room's position: the sequencer delivers every write
in seq order, skipping only writes whose key a later delivered write replaced
(``Sequencer.state_page``).
"""

from __future__ import annotations

from collections.abc import Callable

from chat_gateway.storage.records import StateEntry, StateSnapshot, values_json

# The snapshot as ``GET /v1/rooms/{room}/state`` answers it (chat_gateway.core.frames,
# ``state_document``), kept beside each transport's frame.
DOCUMENT = "document"


class LiveState:
    """Each key's newest entry (tombstones included), and the encoded snapshot."""

    __slots__ = ("entries", "purged_seq", "_frames", "_frames_seq")

    def __init__(self, snapshot: StateSnapshot) -> None:
        self.entries: dict[str, StateEntry] = {e.key: e for e in snapshot.entries}
        # A resume from below this seq may have missed a purged tombstone.
        self.purged_seq = snapshot.purged_seq
        self._frames: dict[str, bytes] = {}
        self._frames_seq = -1

    def apply(self, entry: StateEntry) -> None:
        """A write delivered in order."""
        self.entries[entry.key] = entry
        self._frames.clear()

    def prune(self, before_ms: int) -> int:
        """Forget tombstones written before ``before_ms`` (as the store purges them
        after ``STATE_TOMBSTONE_TTL``), raising the purged seq past them, so a held
        room's memory does not grow with deleted keys. Returns how many went."""
        gone = [e for e in self.entries.values() if e.value is None and e.updated_ms < before_ms]
        for entry in gone:
            del self.entries[entry.key]
            self.purged_seq = max(self.purged_seq, entry.seq)
        return len(gone)

    def resumable(self, since: int) -> bool:
        """Whether a resume from ``since`` can be answered with the writes after it
        (else a whole snapshot: a tombstone above it may be purged)."""
        return since >= self.purged_seq

    def since(self, seq: int) -> list[StateEntry]:
        """Every key whose newest write is after ``seq``, in seq order, tombstones too."""
        return sorted((e for e in self.entries.values() if e.seq > seq), key=lambda e: e.seq)

    def snapshot(self, form: str, seq: int, build: Callable[[str, bytes], bytes]) -> bytes:
        """The snapshot at ``seq`` in ``form`` (a transport's frame, or
        :data:`DOCUMENT`), built by ``build(form, values JSON)`` once per form until
        the next write."""
        if self._frames_seq != seq:
            self._frames.clear()
            self._frames_seq = seq
        frame = self._frames.get(form)
        if frame is None:
            values = values_json(sorted(self.entries.values(), key=lambda e: e.seq))
            frame = self._frames[form] = build(form, values)
        return frame
