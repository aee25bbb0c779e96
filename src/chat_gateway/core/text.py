"""What a name or text the gateway stores may not hold, checked wherever one comes
in: a posted body (``chat_gateway.api.validation``) and a token's ``sub``
(``chat_gateway.access.auth``), which becomes a message's author.

Postgres refuses a NUL character in text, and a lone surrogate (which JSON's
``\\ud800`` escapes can carry) has no UTF-8 form, so either would fail the
statement that stores it; the gateway refuses them up front instead.
"""

from __future__ import annotations


def flaw(value: str) -> str | None:
    """Why ``value`` cannot be stored, as the end of a sentence about it ("must not
    contain NUL characters"); None when it can."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (no lone surrogates)"
    return None
