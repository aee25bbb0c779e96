"""Full-text search, the part both stores share: the query language, the rooms a
caller may search, the cursor and the highlights.

A query ``q`` holds words, ``"quoted phrases"`` and ``-excluded`` words or
phrases. Every word and phrase must occur; no excluded one may. The last word,
when the query ends with a bare word, also matches as a prefix (``mee`` finds
"meeting"), so a search box can ask as the user types.

Words are what both stores index: runs of letters and digits (Python's
``[^\\W_]+``), compared without case. Anything else separates words, so
``foo-bar`` or ``foo.bar`` in a query is the phrase ``"foo bar"``, and in a
message it is found by either word. Postgres indexes the text with those
separators replaced by spaces (``messages_search_vector``), SQLite's FTS5
``unicode61`` tokenizer splits the same way, so both find the same messages.

Highlights are ``[start, end)`` offsets into the message's text, counted in
code points (Python ``str`` indices; in JavaScript, where strings count UTF-16
units, convert with ``Array.from(text)``): every word of the text equal to a
query word, or starting with the prefix word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from chat_gateway.storage.records import Message

MAX_QUERY_CHARS = 500
MAX_LIMIT = 100
MAX_ROOMS = 100

_WORD = re.compile(r"[^\W_]+")
# A quoted phrase (closed, or running to the end), or a bare run of non-space.
_PART = re.compile(r'(-?)"([^"]*)"?|(\S+)')


class BadQuery(ValueError):
    """A query, cursor or scope the stores cannot run; the message says why."""


class NothingToFind(BadQuery):
    """A ``q`` with no word to find (only spaces, signs or excluded words): it matches
    no message, so the route answers an empty page rather than an error."""


class SearchTimeout(Exception):
    """The search ran past its time bound and was cancelled."""


@dataclass(frozen=True, slots=True)
class Term:
    """A word (one entry in ``words``) or a phrase (several, in order)."""

    words: tuple[str, ...]
    negated: bool = False
    prefix: bool = False  # the last word of the query, bare: also a prefix


@dataclass(frozen=True, slots=True)
class Query:
    terms: tuple[Term, ...]

    @property
    def positive(self) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if not t.negated)

    def tsquery(self) -> str:
        """The Postgres ``to_tsquery`` text: every term ANDed, phrases with ``<->``.
        Words are letters and digits only, so they never need escaping."""

        def one(t: Term) -> str:
            words = [f"'{w}'" for w in t.words]
            if t.prefix:
                words[-1] += ":*"
            text = " <-> ".join(words)
            if len(words) > 1:
                text = f"({text})"
            return f"!{text}" if t.negated else text

        return " & ".join(one(t) for t in self.terms)

    def fts5(self) -> str:
        """The SQLite FTS5 ``MATCH`` text: the terms ANDed, then each excluded one
        taken away with ``NOT`` (FTS5's NOT is binary)."""

        def one(t: Term) -> str:
            return '"' + " ".join(t.words) + '"' + ("*" if t.prefix else "")

        text = "(" + " AND ".join(one(t) for t in self.positive) + ")"
        for t in self.terms:
            if t.negated:
                text += " NOT " + one(t)
        return text


def parse_query(q: str) -> Query:
    """``q`` as terms, or ``BadQuery``: empty or over ``MAX_QUERY_CHARS`` characters
    (``NothingToFind``: no word to find, only excluded ones). The length bounds the
    number of words; what a query costs the database is bounded by its timeout."""
    if not 1 <= len(q) <= MAX_QUERY_CHARS:
        raise BadQuery(f"q must be 1..{MAX_QUERY_CHARS} characters")
    terms: list[Term] = []
    last_bare = False
    for m in _PART.finditer(q):
        if m.group(3) is not None:
            raw = m.group(3)
            negated = raw.startswith("-") and len(raw) > 1
            if negated:
                raw = raw[1:]
            bare = True
        else:
            negated, raw, bare = m.group(1) == "-", m.group(2), False
        words = tuple(w.lower() for w in _WORD.findall(raw))
        if not words:
            continue
        terms.append(Term(words, negated))
        last_bare = bare and not negated
    if not any(not t.negated for t in terms):
        raise NothingToFind("q holds no word to find (letters or digits, not excluded)")
    if last_bare:
        terms[-1] = Term(terms[-1].words, prefix=True)
    return Query(tuple(terms))


@dataclass(frozen=True, slots=True)
class RoomScope:
    """The rooms a search may look in, applied inside the store's query (before its
    limit): ``everything``, or the rooms named in ``names`` or starting with one of
    ``prefixes`` (a ``prefix:*`` pattern of a token without its ``*``). Rooms in
    ``excluded`` are left out whatever else matches: the place for rooms the caller
    is barred from (a ban), as the store's filter already takes them."""

    everything: bool = False
    names: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    excluded: tuple[str, ...] = field(default=())

    @classmethod
    def of_patterns(cls, *claims: tuple[str, ...] | None) -> RoomScope:
        """The union of token claims (``rooms``, ``read_rooms``): ``*`` at the end of
        a pattern matches any rest, anything else is a room's name."""
        names: list[str] = []
        prefixes: list[str] = []
        for patterns in claims:
            for p in patterns or ():
                if p.endswith("*"):
                    prefixes.append(p[:-1])
                else:
                    names.append(p)
        if "" in prefixes:
            return cls(everything=True)
        return cls(names=tuple(dict.fromkeys(names)), prefixes=tuple(dict.fromkeys(prefixes)))

    @property
    def empty(self) -> bool:
        return not self.everything and not self.names and not self.prefixes


# A cursor is ``created_ms.seq.room``: every string of this shape is a position in
# the newest-first order, so a cursor never needs to be one this server made.
MAX_CURSOR_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z
CURSOR_RE = re.compile(r"([0-9]{1,18})\.([0-9]{1,18})\.([A-Za-z0-9][A-Za-z0-9_.:-]{0,127})")


@dataclass(frozen=True, slots=True)
class Cursor:
    """The last row's sort key: results run newest first by creation time, then by
    room and seq (descending), so a cursor stays exact while new posts arrive."""

    created_ms: int
    room: str
    seq: int

    def encode(self) -> str:
        return f"{self.created_ms}.{self.seq}.{self.room}"

    @classmethod
    def decode(cls, text: str) -> Cursor:
        m = CURSOR_RE.fullmatch(text)
        if m is None:
            raise BadQuery("cursor is not one this route returned")
        # A time past the last a timestamp can hold is a place after every message.
        return cls(min(int(m.group(1)), MAX_CURSOR_MS), m.group(3), int(m.group(2)))

    @classmethod
    def after(cls, msg: Message) -> Cursor:
        return cls(msg.created_ms, msg.room, msg.seq)


@dataclass(frozen=True, slots=True)
class Hit:
    message: Message
    highlights: list[tuple[int, int]]

    def to_dict(self) -> dict[str, object]:
        return {"message": self.message.to_dict(), "highlights": self.highlights}


def highlights(text: str, query: Query) -> list[tuple[int, int]]:
    """The ``[start, end)`` code point spans of ``text``'s words that the query's
    words or phrases name (or that start with its prefix word), in order."""
    exact: set[str] = set()
    prefixes: list[str] = []
    for t in query.positive:
        exact.update(t.words)
        if t.prefix:
            prefixes.append(t.words[-1])
    out = []
    for m in _WORD.finditer(text):
        word = m.group().lower()
        if word in exact or any(word.startswith(p) for p in prefixes):
            out.append((m.start(), m.end()))
    return out


def hits(messages: list[Message], query: Query) -> list[Hit]:
    return [Hit(m, highlights(m.text, query)) for m in messages]
