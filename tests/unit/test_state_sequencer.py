"""A state room's sequencing and conflation without I/O (chat_gateway.core.sequencer,
chat_gateway.core.conflation, chat_gateway.core.state).

A state room's store keeps each key's newest write only, so a gap fill, which
reads "the current keys written after the position", never sees a seq whose key
was written again: the fill must move past such seqs instead of waiting for them
forever. Writes are revealed one by one, their live payloads dropped, repeated
and reordered at random, fills answered from the store as it is when they run,
timers fired on a virtual clock: the delivered stream never goes back in seq,
never gives a key an older value after a newer one, and once everything is
committed and the timers have run, the values delivered are the store's."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat_gateway.core.conflation import ConflationBuffer
from chat_gateway.core.sequencer import Sequencer, Timer
from chat_gateway.core.state import LiveState
from chat_gateway.storage.records import StateEntry, StateSnapshot

ROOM = "board:x"


@dataclass(frozen=True)
class Row:
    """A stored key as the fill reads it (the shape of a StoredMessage)."""

    seq: int
    key: str
    value: int | None

    @property
    def created_ms(self) -> int:
        return 0

    def to_json(self) -> bytes:
        return StateEntry(ROOM, self.key, self.seq, _value(self.value), 0).to_json()


def _value(value: int | None) -> bytes | None:
    return None if value is None else b"%d" % value


class World:
    """A sequencer and its shell: a store of current rows, a virtual clock, and
    what was delivered, applied to a LiveState as the hub applies it."""

    def __init__(self) -> None:
        self.rows: dict[str, Row] = {}  # the store: each key's newest write
        self.last_seq = 0
        self.now = 0.0
        self.timers: dict[Timer, float] = {}
        self.fills = 0
        self.delivered: list[int] = []
        self.state = LiveState(StateSnapshot(ROOM, 0, []))
        self.newest: dict[str, int] = {}
        self.seq = Sequencer(
            SimpleNamespace(
                deliver=self.deliver,
                deliver_change=lambda *_: None,
                skip_changes=lambda *_: None,
                schedule=self.schedule,
                fill=self.fill,
                fill_changes=lambda: None,
            ),
            clock=lambda: self.now,
            gap_wait=0.25,
            page_size=200,
            max_pending=50,
        )
        self.seq.start(0, 0)

    def write(self, key: str, value: int | None) -> Row:
        self.last_seq += 1
        row = Row(self.last_seq, key, value)
        self.rows[key] = row
        return row

    def deliver(self, seq: int, created_ms: int, changes: int | None, body: bytes) -> None:
        assert not self.delivered or seq > self.delivered[-1], "back in seq"
        entry = StateEntry.from_json(ROOM, seq, created_ms, body)
        assert seq > self.newest.get(entry.key, 0), "an older value after a newer one"
        self.newest[entry.key] = seq
        self.delivered.append(seq)
        self.state.apply(entry)

    def schedule(self, timer: Timer, delay: float | None) -> None:
        if delay is None:
            self.timers.pop(timer, None)
        else:
            self.timers[timer] = self.now + delay

    def fill(self) -> None:
        self.fills += 1  # run by run_fill, as the hub's task would, later

    def run_fill(self) -> None:
        """The hub's _fill for a state room: one read of the current rows after the
        position, with the room's last seq."""
        after = self.seq.fill_next()
        rows = sorted((r for r in self.rows.values() if r.seq > after), key=lambda r: r.seq)
        self.seq.state_page(rows, self.last_seq)
        self.seq.fill_done()

    def live(self, row: Row) -> None:
        self.seq.live_message(row.seq, 0, None, row.to_json())

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for timer, due in list(self.timers.items()):
            if due <= self.now:
                del self.timers[timer]
                self.seq.timer_fired(timer)
        while self.seq.filling:
            self.run_fill()

    def values(self) -> dict[str, bytes]:
        return {k: e.value for k, e in self.state.entries.items() if e.value is not None}

    def stored(self) -> dict[str, bytes]:
        return {k: b"%d" % r.value for k, r in self.rows.items() if r.value is not None}


def test_a_gap_whose_seq_was_overwritten_is_passed_not_waited_for():
    w = World()
    first = w.write("a", 1)  # seq 1: its live payload is lost
    second = w.write("a", 2)  # seq 2 overwrites it in the store
    w.live(second)
    assert w.delivered == [] and w.seq.due(Timer.GAP) is not None
    w.advance(0.3)  # the gap timer fires, the fill reads key a at seq 2 only
    assert w.delivered == [2]
    assert w.seq.seq == 2 and w.seq.waiting == 0 and not w.timers
    # the lost payload arriving late is a repeat
    w.live(first)
    assert w.delivered == [2]
    assert w.values() == {"a": b"2"}


def test_a_fill_moves_to_the_rooms_last_seq_past_writes_it_cannot_show():
    w = World()
    w.write("a", 1)
    w.write("b", 2)
    w.write("a", None)  # seq 3: a tombstone (a row, so it is shown)
    w.rows.pop("a")  # ...then purged: seq 3 is in no row any more
    w.seq.fill()
    w.run_fill()
    assert w.delivered == [2]
    assert w.seq.seq == 3, "up to the room's last seq, not stuck below it"
    w.live(w.write("c", 4))
    assert w.delivered == [2, 4]


def test_live_writes_held_below_a_newer_stored_one_are_dropped():
    w = World()
    rows = [w.write("a", 1), w.write("b", 1), w.write("a", 2)]
    w.live(rows[1])  # seq 2 held: seq 1 missing
    w.seq.fill()
    w.run_fill()  # the store has b@2 and a@3: a@1 is gone, b@2 delivered, then a@3
    assert w.delivered == [2, 3]
    assert w.values() == {"a": b"2", "b": b"1"}
    assert w.seq.waiting == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    writes=st.lists(
        st.tuples(st.sampled_from("abcd"), st.one_of(st.none(), st.integers(0, 99))),
        min_size=1,
        max_size=60,
    ),
    fate=st.lists(st.integers(0, 9), min_size=60, max_size=60),
    waits=st.lists(st.integers(0, 3), min_size=60, max_size=60),
)
def test_random_loss_and_reordering_converge_to_the_store(writes, fate, waits):
    w = World()
    late: list[Row] = []
    for i, (key, value) in enumerate(writes):
        row = w.write(key, value)
        f = fate[i]
        if f < 2:
            pass  # lost
        elif f < 4:
            late.append(row)  # delivered later, out of order
        else:
            w.live(row)
            if f == 9:
                w.live(row)  # repeated
        if late and f % 3 == 0:
            w.live(late.pop(0 if f % 2 else -1))
        w.advance(0.1 * waits[i])
    for row in reversed(late):
        w.live(row)
    for _ in range(4):  # quiet: the timers and fills run out
        w.advance(1.0)
    if w.seq.seq != w.last_seq:  # nothing was pending: a position check's fill
        w.seq.fill()
        w.run_fill()
    assert w.seq.seq == w.last_seq
    assert w.values() == w.stored()
    assert not w.timers and w.seq.waiting == 0


def test_the_conflation_buffer_keeps_each_keys_newest_in_update_order():
    buf: ConflationBuffer[int] = ConflationBuffer()
    assert buf.add("a", 1) is True, "the first update of an interval arms the timer"
    assert buf.add("b", 2) is False
    assert buf.add("a", 3) is False
    assert len(buf) == 2 and buf.updates == 3
    assert buf.take() == [2, 3], "b's newest, then a's newest (its update came last)"
    assert buf.take() == [] and len(buf) == 0
    assert buf.add("c", 4) is True, "empty again: the next update arms it again"


@given(st.lists(st.tuples(st.sampled_from("abc"), st.booleans()), max_size=80))
def test_flushes_in_seq_order_never_give_an_older_value_and_end_exact(updates):
    """Updates fed in seq order, flushed at random points: each flush is in seq
    order, and applying them all gives every key its newest value."""
    buf: ConflationBuffer[tuple[int, str]] = ConflationBuffer()
    held: dict[str, int] = {}
    last = 0
    newest: dict[str, int] = {}
    for seq, (key, flush) in enumerate(updates, 1):
        buf.add(key, (seq, key))
        newest[key] = seq
        if flush:
            for s, k in buf.take():
                assert s > last and s > held.get(k, 0)
                last = held[k] = s
    for s, k in buf.take():
        assert s > last and s > held.get(k, 0)
        last = held[k] = s
    assert held == newest


def test_live_state_answers_since_and_a_cached_snapshot():
    state = LiveState(
        StateSnapshot(
            ROOM,
            5,
            [StateEntry(ROOM, "a", 2, b"1", 0), StateEntry(ROOM, "b", 5, None, 0)],
            purged_seq=1,
        )
    )
    assert [e.key for e in state.since(1)] == ["a", "b"]
    assert [e.key for e in state.since(2)] == ["b"]
    assert state.resumable(1) and not state.resumable(0)
    built: list[bytes] = []

    def build(transport: str, values: bytes) -> bytes:
        built.append(values)
        return values

    assert (
        state.snapshot("ws", 5, build)
        == b'{"a":{"value":1,"seq":2,"updated_at":"1970-01-01T00:00:00.000Z"}}'
    )
    state.snapshot("ws", 5, build)
    assert len(built) == 1, "encoded once until the next write"
    state.apply(StateEntry(ROOM, "c", 6, b"[1]", 0))
    assert b'"c":{"value":[1]' in state.snapshot("ws", 6, build) and len(built) == 2


def test_held_tombstones_are_forgotten_after_their_time_and_resumes_below_get_a_snapshot():
    state = LiveState(StateSnapshot(ROOM, 0, []))
    state.apply(StateEntry(ROOM, "a", 1, b"1", 100))
    state.apply(StateEntry(ROOM, "b", 2, None, 100))
    state.apply(StateEntry(ROOM, "c", 3, None, 500))
    assert state.prune(200) == 1, "b's tombstone only: a lives, c is recent"
    assert sorted(state.entries) == ["a", "c"]
    assert state.purged_seq == 2
    assert not state.resumable(1) and state.resumable(2)
