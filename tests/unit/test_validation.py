"""The published shapes and the checks behind them agree on what is blank."""

from __future__ import annotations

import re

import pytest

from chat_gateway.api import validation as v
from chat_gateway.errors import ApiError

WHITESPACE = [chr(c) for c in range(0x110000) if chr(c).isspace()] + ["\ufeff"]


@pytest.mark.parametrize("blank", WHITESPACE, ids=lambda c: f"U+{ord(c):04X}")
def test_a_blank_name_is_refused_by_the_schema_and_by_the_check_alike(blank):
    # JSON Schema patterns are ECMA-262 regexes, whose \s differs from Python's
    # (\x1c-\x1f, \x85, \ufeff): a value one side calls blank the other must too
    assert not re.search(v.REACTION["pattern"], blank)
    with pytest.raises(ApiError):
        v.reaction(blank)
    assert v.reaction(f"{blank}ok{blank}") == "ok"
    assert re.search(v.REACTION["pattern"], f"{blank}ok{blank}")


def test_a_visible_control_character_is_a_name_on_both_sides():
    assert re.search(v.REACTION["pattern"], "\x1b")
    assert v.reaction("\x1b") == "\x1b"
