"""The search query language and highlights (chat_gateway.storage.search), without a
store: what a query becomes for Postgres and for SQLite's FTS5, and highlight spans
in code points."""

from __future__ import annotations

import pytest

from chat_gateway.storage.search import (
    MAX_CURSOR_MS,
    BadQuery,
    Cursor,
    highlights,
    parse_query,
)


def test_query_language() -> None:
    assert parse_query('Deploy "the release" -friday notes').tsquery() == (
        "'deploy' & ('the' <-> 'release') & !'friday' & 'notes':*"
    )
    assert parse_query('Deploy "the release" -friday notes').fts5() == (
        '("deploy" AND "the release" AND "notes"*) NOT "friday"'
    )
    for bad in ["", "   ", "-only", '-"only this"', "x" * 501, "!!! ..."]:
        with pytest.raises(BadQuery):
            parse_query(bad)
    with pytest.raises(BadQuery):
        Cursor.decode("not-a-cursor")
    c = Cursor(1_700_000_000_123, "room:a", 42)
    assert Cursor.decode(c.encode()) == c
    # every cursor of the documented shape is a place: one past the last time a
    # timestamp holds is after every message
    far = Cursor.decode("999999999999999999.1.r")
    assert far.created_ms == MAX_CURSOR_MS and far.seq == 1 and far.room == "r"


def test_any_number_of_words_the_length_allows_is_a_query() -> None:
    # what the schema allows (1..500 characters) is a query: no count of words
    # beyond it, which a JSON Schema could not say (the timeout bounds the cost)
    q = parse_query(" ".join("w" * 2 for _ in range(160)))  # 479 characters
    assert len(q.terms) == 160


def test_highlights_are_code_point_offsets() -> None:
    text = "Ünïcode 😀 meeting, Meetings! meet"
    spans = highlights(text, parse_query("meeting"))
    assert [text[a:b] for a, b in spans] == ["meeting", "Meetings"]
    assert spans[0] == (10, 17)  # the emoji is one code point
