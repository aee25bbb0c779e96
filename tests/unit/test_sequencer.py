"""The room sequencer (chat_gateway.core.sequencer) on its own: no loop, no broker, no store.

A committed history of messages and changes is revealed commit by commit; the
live payloads of each commit are dropped, repeated, reordered and delayed at
random; the store answers fills from what is committed at the moment it
answers, in pages of a random size, sometimes shorter than asked, sometimes
failing; timers fire on a virtual clock; position checks and reconnects come
at random. Whatever happens, the room's delivered stream is exactly the
committed one after the room's starting position, in commit order: messages by
seq, changes by number, each change after the messages committed before it and
before those committed after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat_gateway.core.sequencer import Sequencer, Timer, merge

# -- the store's answers, as plain values ------------------------------------------


@dataclass(frozen=True)
class Msg:
    """A message as stored; ``json`` names it (``m<seq>``, or ``c<n>`` as change n left it)."""

    seq: int
    created_ms: int = 0
    json: bytes = b""

    def to_json(self) -> bytes:
        return self.json or b"m%d" % self.seq


@dataclass(frozen=True)
class Chg:
    change: int
    after_seq: int

    @property
    def message(self) -> Msg:
        return Msg(self.after_seq, json=b"c%d" % self.change)

    def body(self) -> bytes:
        return self.message.to_json()


Commit = tuple[str, int, int]  # ("m", seq, changes before) or ("c", number, after_seq)


def history(kinds: list[bool]) -> list[Commit]:
    """A room's commits from a list of kinds (True: a message, False: an edit or
    delete, which needs a message before it)."""
    commits: list[Commit] = []
    seq = changes = 0
    for is_message in kinds:
        if is_message or seq == 0:
            seq += 1
            commits.append(("m", seq, changes))
        else:
            changes += 1
            commits.append(("c", changes, seq))
    return commits


class Choices:
    """The random stream a case is driven by; zeros once it runs out."""

    def __init__(self, values: list[int]) -> None:
        self.values = values
        self.at = 0

    def __call__(self, n: int) -> int:
        if n <= 1:
            return 0
        if self.at >= len(self.values):
            return 0
        self.at += 1
        return self.values[self.at - 1] % n

    @property
    def left(self) -> bool:
        return self.at < len(self.values)


@dataclass
class Fill:
    """A fill the sequencer asked for, as the hub's task runs it: each stage is one
    await, and the sequencer's calls between awaits are made as the hub makes them."""

    stage: str = "start"  # start, history, changes
    after: int = 0
    page: list[Msg] = field(default_factory=list)
    has_more: bool = False
    known: int = 0
    seen: int = 0  # messages (changes, for a change fill) committed at the last read


class World:
    """The sequencer, and everything around it that the hub would be."""

    def __init__(
        self, commits: list[Commit], choose: Choices, page_size: int, max_pending: int
    ) -> None:
        self.commits = commits
        self.choose = choose
        self.page_size = page_size
        self.committed = 0  # commits revealed so far
        self.network: list[tuple[str, int, int]] = []  # live payloads in flight
        self.now = 0.0
        self.timers: dict[Timer, float] = {}
        self.fill: Fill | None = None
        self.changes_fill: Fill | None = None
        self.delivered: list[tuple[str, int]] = []
        self.expected: list[tuple[str, int]] = []
        self.seq = Sequencer(
            SimpleNamespace(
                deliver=self.deliver,
                deliver_change=self.deliver_change,
                skip_changes=self.skip_changes,
                schedule=self.schedule,
                fill=self.start_fill,
                fill_changes=self.start_changes_fill,
            ),
            clock=lambda: self.now,
            gap_wait=0.25,
            page_size=page_size,
            max_pending=max_pending,
        )

    # -- what the sequencer calls --------------------------------------------------

    def deliver(self, seq: int, created_ms: int, changes: int | None, body: bytes) -> None:
        assert body == b"m%d" % seq
        self.delivered.append(("m", seq))
        assert self.delivered == self.expected[: len(self.delivered)], self.delivered

    def deliver_change(self, number: int, after_seq: int, body: bytes) -> None:
        assert body == b"c%d" % number
        assert after_seq == self.after_seq(number)
        self.delivered.append(("c", number))
        assert self.delivered == self.expected[: len(self.delivered)], self.delivered

    def skip_changes(self, previous: int, to: int) -> None:
        raise AssertionError("nothing was removed from the store: nothing to skip")

    def schedule(self, timer: Timer, delay: float | None) -> None:
        if delay is None:
            del self.timers[timer]
        else:
            assert timer not in self.timers, "armed twice"
            self.timers[timer] = self.now + delay

    def start_fill(self) -> None:
        assert self.fill is None, "a second message fill while one runs"
        self.fill = Fill()

    def start_changes_fill(self) -> None:
        assert self.changes_fill is None, "a second change fill while one runs"
        self.changes_fill = Fill()

    # -- the room's history ----------------------------------------------------------

    def after_seq(self, number: int) -> int:
        return next(c[2] for c in self.commits if c[0] == "c" and c[1] == number)

    def position(self, upto: int) -> tuple[int, int]:
        """(messages, changes) among the first ``upto`` commits."""
        done = self.commits[:upto]
        return sum(1 for c in done if c[0] == "m"), sum(1 for c in done if c[0] == "c")

    def commit(self) -> None:
        kind, number, other = self.commits[self.committed]
        self.committed += 1
        fate = self.choose(6)
        copies = 0 if fate == 0 else 2 if fate == 1 else 1  # lost, repeated, once
        self.network.extend([(kind, number, other)] * copies)

    def arrive(self, index: int) -> None:
        kind, number, other = self.network.pop(index)
        if kind == "m":
            self.seq.live_message(number, 0, other, b"m%d" % number)
        else:
            self.seq.live_change(number, other, b"c%d" % number)

    # -- the store -------------------------------------------------------------------

    def messages_after(self, after: int) -> tuple[list[Msg], bool]:
        stored = [Msg(c[1]) for c in self.commits[: self.committed] if c[0] == "m" and c[1] > after]
        size = self.page_size
        if self.choose(4) == 0:
            size = 1 + self.choose(size)  # a page cut short; has_more says so
        return stored[:size], len(stored) > size

    def changes_after(self, after: int) -> list[Chg]:
        stored = [
            Chg(c[1], c[2]) for c in self.commits[: self.committed] if c[0] == "c" and c[1] > after
        ]
        return stored[: self.page_size]

    def step_fill(self, may_fail: bool) -> None:
        """One await of the hub's message fill (Hub._fill)."""
        f = self.fill
        assert f is not None
        s = self.seq
        if f.stage == "start":
            if not s.open:
                self.end_fill()
                return
            f.after = s.fill_next()
            f.stage = "history"
            return
        if may_fail and self.choose(8) == 0:
            self.end_fill()  # StoreUnavailable
            return
        if f.stage == "history":
            f.page, f.has_more = self.messages_after(f.after)
            f.seen = self.position(self.committed)[0]
            f.known = s.change
            if f.page:
                f.stage = "changes"
                return
            changes: list[Chg] = []
        else:
            changes = self.changes_after(f.known)
        if s.fill_page(f.page, f.has_more, changes, f.known):
            f.after = s.fill_next()
            f.stage = "history"
        else:
            # Done: it reached what the store held when it read, or holds what it
            # could not hand over yet (and a timer brings it back).
            assert s.seq is not None and (s.seq >= f.seen or s.waiting), "a fill stopped short"
            self.end_fill()

    def end_fill(self) -> None:
        self.fill = None
        self.seq.fill_done()

    def step_changes_fill(self, may_fail: bool) -> None:
        """One await of the hub's change fill (Hub._fill_changes)."""
        f = self.changes_fill
        assert f is not None
        s = self.seq
        if f.stage == "start":
            f.after = s.changes_next()
            f.stage = "changes"
            return
        if may_fail and self.choose(8) == 0:
            self.end_changes_fill()
            return
        seen = self.position(self.committed)[1]
        if s.changes_page(self.changes_after(f.after)):
            f.after = s.changes_next()
        else:
            assert s.change >= seen or s.waiting, "a change fill stopped short"
            self.end_changes_fill()

    def end_changes_fill(self) -> None:
        self.changes_fill = None
        self.seq.changes_fill_done()

    # -- the hub's clock and checks ---------------------------------------------------

    def fire_timer(self) -> None:
        timer = min(self.timers, key=lambda t: self.timers[t])
        self.now = max(self.now, self.timers.pop(timer))
        self.seq.timer_fired(timer)

    def check_positions(self) -> bool:
        """Hub.check_positions and RedisChat.check_changes, with the truth. True
        when one of them asked for a fill."""
        s = self.seq
        messages, changes = self.position(self.committed)
        asked = False
        if s.seq is not None and messages > s.seq and not s.filling:
            s.fill()
            asked = True
        if s.seq is not None and changes > s.change and not s.filling_changes:
            s.fill_changes()
            asked = True
        return asked

    # -- a run ------------------------------------------------------------------------

    def check_held(self) -> None:
        """Whatever the sequencer holds, a timer or a fill will come back to it."""
        s = self.seq
        if s.seq is not None and s.waiting:
            assert self.timers or self.fill or self.changes_fill, "held with nothing to fill it"

    def step(self) -> None:
        """One thing happens, chosen at random among those that can."""
        s, choose = self.seq, self.choose
        actions = []
        if self.committed < len(self.commits):
            actions += ["commit"] * 3
        if self.network:
            actions += ["arrive"] * 3 + ["lose"]
        if self.timers:
            actions.append("timer")
        if self.fill is not None:
            actions += ["fill"] * 2
        if self.changes_fill is not None:
            actions += ["changes"] * 2
        if s.seq is not None:
            actions += ["check", "reconnect"]
        action = actions[choose(len(actions))]
        if action == "commit":
            self.commit()
        elif action == "arrive":
            self.arrive(choose(len(self.network)))
        elif action == "lose":
            self.network.pop(choose(len(self.network)))
        elif action == "timer":
            self.fire_timer()
        elif action == "fill":
            self.step_fill(may_fail=True)
        elif action == "changes":
            self.step_changes_fill(may_fail=True)
        elif action == "check":
            self.check_positions()
        else:  # the broker link came back: every held room is filled
            s.fill()
            s.fill_changes()

    def settle(self) -> None:
        """No more commits and no more failures: run until nothing is left to do, as
        the hub would with its timers and its periodic position checks."""
        for _ in range(100_000):
            if self.network:
                self.arrive(self.choose(len(self.network)))
            elif self.fill is not None:
                self.step_fill(may_fail=False)
            elif self.changes_fill is not None:
                self.step_changes_fill(may_fail=False)
            elif self.timers:
                self.fire_timer()
            elif not self.check_positions():
                return
            self.check_held()
        raise AssertionError("the room never settled")


@settings(
    max_examples=3000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    kinds=st.lists(st.booleans(), max_size=40),
    joined=st.integers(0, 40),
    page_size=st.integers(1, 6),
    max_pending=st.integers(1, 8),
    script=st.lists(st.integers(0, 1 << 16), max_size=400),
)
def test_the_delivered_stream_is_the_committed_one(
    kinds: list[bool], joined: int, page_size: int, max_pending: int, script: list[int]
) -> None:
    commits = history(kinds)
    choose = Choices(script)
    world = World(commits, choose, page_size, max_pending)
    # Joining: the room's channel is subscribed, some commits go by (their payloads
    # may reach the sequencer before its position is known), then the position is
    # read from the store: what it covers is not delivered again.
    for _ in range(min(joined, len(commits))):
        world.commit()
        while world.network and choose(3) == 0:
            world.arrive(choose(len(world.network)))
    start = world.committed
    world.expected = [(c[0], c[1]) for c in commits[start:]]
    world.seq.start(*world.position(start))
    while choose.left:
        world.step()
        world.check_held()
    while world.committed < len(commits):
        world.commit()
    world.settle()
    assert world.delivered == world.expected
    assert world.seq.waiting == 0 and not world.timers
    assert (world.seq.seq, world.seq.change) == world.position(len(commits))


# -- the merge on its own --------------------------------------------------------------


@settings(max_examples=1000, deadline=None)
@given(
    kinds=st.lists(st.booleans(), max_size=40),
    cut=st.integers(0, 40),
    known=st.integers(0, 40),
    page_size=st.integers(1, 8),
)
def test_merge_interleaves_in_commit_order(
    kinds: list[bool], cut: int, known: int, page_size: int
) -> None:
    """A page of messages after ``cut`` and the changes after ``known`` read next,
    merged: each change right after the messages committed before it; with a full
    change page, no message past its last change."""
    commits = history(kinds)
    messages = [Msg(c[1]) for c in commits if c[0] == "m" and c[1] > cut][:page_size]
    changes = [Chg(c[1], c[2]) for c in commits if c[0] == "c" and c[1] > known][:page_size]
    merged = merge(messages, changes, page_size=page_size)
    flat: list[tuple[str, int]] = []
    for preceding, msg in merged.steps:
        flat += [("c", c.change) for c in preceding]
        flat.append(("m", msg.seq))
    flat += [("c", c.change) for c in merged.rest]
    order = {(c[0], c[1]): i for i, c in enumerate(commits)}
    assert [order[x] for x in flat] == sorted(order[x] for x in flat), "commit order"
    assert [x for x in flat if x[0] == "c"] == [("c", c.change) for c in changes]
    taken = [msg for _, msg in merged.steps]
    assert taken == messages[: len(taken)]
    assert merged.bounded == (len(changes) == page_size)
    if not merged.bounded:
        assert taken == messages
    else:
        assert all(m.seq <= changes[-1].after_seq for m in taken)
        assert all(m.seq > changes[-1].after_seq for m in messages[len(taken) :])
    for preceding, msg in merged.steps:
        assert all(c.after_seq < msg.seq for c in preceding)


# -- single cases the stream property does not reach ------------------------------------


def plain(out: list[tuple[object, ...]], **given: object) -> Sequencer:
    """A sequencer whose deliveries and skips go to ``out``; what else it calls does
    nothing unless ``given``."""
    shell: dict[str, object] = {
        "deliver": lambda seq, *_: out.append(("m", seq)),
        "deliver_change": lambda number, *_: out.append(("c", number)),
        "skip_changes": lambda previous, to: out.append(("skip", previous, to)),
        "schedule": lambda timer, delay: None,
        "fill": lambda: None,
        "fill_changes": lambda: None,
    }
    options: dict[str, object] = {
        "clock": lambda: 0.0,
        "gap_wait": 0.25,
        "page_size": 10,
        "max_pending": 10,
    }
    for name, value in given.items():
        (shell if name in shell else options)[name] = value
    return Sequencer(SimpleNamespace(**shell), **options)  # type: ignore[arg-type]


def test_change_numbers_removed_from_the_store_are_skipped() -> None:
    """Retention or a purge removed changes 2 and 3 with their messages: a fill that
    reads change 4 first moves the room past them, and tells the hub."""
    out: list[tuple[object, ...]] = []
    s = plain(out)
    s.start(5, 1)
    s.fill_changes()
    s.changes_next()
    assert not s.changes_page([Chg(4, 5), Chg(5, 5)])
    s.changes_fill_done()
    assert out == [("skip", 1, 3), ("c", 4), ("c", 5)]
    assert (s.seq, s.change, s.waiting) == (5, 5, 0)


def test_a_message_waits_for_the_changes_committed_before_it() -> None:
    out: list[tuple[object, ...]] = []
    timers: dict[Timer, float | None] = {}
    s = plain(out, schedule=timers.__setitem__, clock=lambda: 10.0)
    s.start(1, 0)
    s.live_message(2, 0, 1, b"m2")  # committed after change 1, not here yet
    assert out == [] and s.due(Timer.GAP) == 10.25 and timers == {Timer.GAP: 0.25}
    s.live_change(1, 1, b"c1")
    assert out == [("c", 1), ("m", 2)]
    assert s.due(Timer.GAP) is None and timers == {Timer.GAP: None}


def test_a_fill_reads_on_past_a_page_delivered_live_meanwhile() -> None:
    """The fill's page (a full one: more in the store) arrives live while the fill
    reads the change log: nothing new in it, nothing held, so the fill reads the
    next page instead of leaving the rest to the next position check."""
    out: list[tuple[object, ...]] = []
    s = plain(out, page_size=1)
    s.start(0, 0)
    s.fill()  # a position check: messages 1 and 2 committed, 2's publish lost
    assert s.fill_next() == 0
    s.live_message(1, 0, 0, b"m1")  # while the fill awaits the store
    assert s.fill_page([Msg(1)], True, [], 0), "stopped with message 2 unread"
    assert s.fill_next() == 1
    assert not s.fill_page([Msg(2)], False, [], 0)
    s.fill_done()
    assert out == [("m", 1), ("m", 2)] and s.waiting == 0
