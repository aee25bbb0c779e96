"""The pieces of a multi-host Redis URL (``redis+cluster://``, ``redis+sentinel://``)
that every such scheme spells the same way: the credentials and the host list."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote


def credentials(userinfo: str) -> dict[str, Any]:
    """``user:password`` or ``password`` (as in ``redis://``) as connection options."""
    if not userinfo:
        return {}
    user, colon, password = userinfo.partition(":")
    if colon:
        return {"username": unquote(user) or None, "password": unquote(password)}
    return {"password": unquote(user)}


def hosts(text: str, default_port: int) -> list[tuple[str, int]]:
    """``h1:p1,h2,[::1]:p3`` as ``(host, port)`` pairs; a host without a port gets
    ``default_port``."""
    found = []
    for part in filter(None, text.split(",")):
        host, colon, port = part.rpartition(":")
        if not colon or not port.isdigit():
            host, port = part, str(default_port)
        found.append((host.strip("[]"), int(port)))
    return found
