"""Room kinds, by namespace: the rules of ``NAMESPACES_FILE``, parsed and looked up.

A room's namespace is the part of its name before the first ``:`` (``ticker:btc``
is in ``ticker``; ``lobby`` is in the default namespace ``""``). The file is TOML::

    [namespaces.ticker]
    kind = "state"          # "stored" (default) | "ephemeral" | "state"
    client_publish = false  # may users (not only API keys) publish here; default true
    presence = false        # default true
    conflate_ms = 250       # default for subscribers of ephemeral/state rooms; 0 = every update
    rate_limit = "100/1s"   # overrides RATE_LIMIT here
    publish_hook = false    # ask PUBLISH_HOOK_URL about users' posts here; default true

A namespace the file does not name is a stored room as in v1, with every
default. Pure: no I/O but :func:`load`'s one read of the file at start; every
path that acts on a room asks :meth:`Namespaces.of`.
"""

from __future__ import annotations

import enum
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,126}")


class NamespaceError(ValueError):
    """The namespaces file cannot be used; the message is one line for the operator."""


class RoomKind(enum.StrEnum):
    STORED = "stored"  # messages with seq, as in v1
    EPHEMERAL = "ephemeral"  # events fanned out, nothing stored
    STATE = "state"  # the latest JSON value per key, each write a seq of the room


SUPPORTED = (RoomKind.STORED, RoomKind.EPHEMERAL, RoomKind.STATE)


@dataclass(frozen=True, slots=True)
class Namespace:
    """One namespace's rules; ``rate_limit`` is the text of a ``RATE_LIMIT`` value
    (checked at load by the caller's parser), None: ``RATE_LIMIT`` applies."""

    name: str = ""
    kind: RoomKind = RoomKind.STORED
    client_publish: bool = True
    presence: bool = True
    conflate_ms: int = 0
    rate_limit: str | None = None
    publish_hook: bool = True  # with PUBLISH_HOOK_URL set: users' posts and edits ask it

    @property
    def stored(self) -> bool:
        return self.kind is RoomKind.STORED


DEFAULT = Namespace()


def namespace_of(room: str) -> str:
    """The part of ``room`` before its first ``:``; ``""`` when it has none."""
    head, colon, _ = room.partition(":")
    return head if colon else ""


@dataclass(frozen=True, slots=True)
class Namespaces:
    """Every configured namespace by name; ``path`` is the file they came from."""

    path: str | None = None
    rules: Mapping[str, Namespace] = field(default_factory=dict)

    def of(self, room: str) -> Namespace:
        """The rules of ``room``'s namespace (the defaults when none is configured)."""
        return self.rules.get(namespace_of(room), DEFAULT)

    def __str__(self) -> str:  # as --help shows the default
        return self.path or "unset"


_OPTIONS: dict[str, type] = {
    "kind": str,
    "client_publish": bool,
    "presence": bool,
    "conflate_ms": int,
    "rate_limit": str,
    "publish_hook": bool,
}


def load(path: str, check_rate: Callable[[str, str], object]) -> Namespaces:
    """Read and check the file at ``path``; :class:`NamespaceError` says what is
    wrong in one line. ``check_rate(text, name)`` raises ``ValueError`` for a
    ``rate_limit`` it cannot use."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise NamespaceError(f"NAMESPACES_FILE={path!r} cannot be read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise NamespaceError(f"NAMESPACES_FILE={path!r} is not valid TOML: {exc}") from None
    return Namespaces(path, parse(data, check_rate, where=f"NAMESPACES_FILE={path!r}"))


def parse(
    data: Mapping[str, Any], check_rate: Callable[[str, str], object], *, where: str
) -> dict[str, Namespace]:
    """The namespaces of a parsed TOML document (see the module's docstring)."""
    unknown = sorted(set(data) - {"namespaces"})
    if unknown:
        raise NamespaceError(f"{where}: unknown table {unknown[0]!r}; use [namespaces.NAME]")
    tables = data.get("namespaces", {})
    if not isinstance(tables, dict):
        raise NamespaceError(f"{where}: namespaces must be a table of [namespaces.NAME] tables")
    out: dict[str, Namespace] = {}
    for name, options in tables.items():
        out[name] = _namespace(name, options, check_rate, f"{where} [namespaces.{name}]")
    return out


def _namespace(
    name: str, options: Any, check_rate: Callable[[str, str], object], where: str
) -> Namespace:
    if name != "" and not NAME_RE.fullmatch(name):
        raise NamespaceError(
            f"{where}: a namespace name is a room name's start, without ':' (^{NAME_RE.pattern}$)"
        )
    if not isinstance(options, dict):
        raise NamespaceError(f"{where} must be a table")
    for key, value in options.items():
        expected = _OPTIONS.get(key)
        if expected is None:
            raise NamespaceError(f"{where}: unknown option {key!r}; known: " + ", ".join(_OPTIONS))
        # bool is an int in Python; TOML keeps them apart, so must this.
        if type(value) is not expected:
            raise NamespaceError(f"{where}: {key} must be a TOML {expected.__name__}")
    kind_text = options.get("kind", RoomKind.STORED.value)
    try:
        kind = RoomKind(kind_text)
    except ValueError:
        raise NamespaceError(
            f"{where}: kind={kind_text!r}; use " + ", ".join(repr(k.value) for k in RoomKind)
        ) from None
    if kind not in SUPPORTED:
        raise NamespaceError(f"{where}: kind={kind.value!r} is not supported yet")
    conflate_ms = options.get("conflate_ms", 0)
    if not 0 <= conflate_ms <= 60_000:
        raise NamespaceError(f"{where}: conflate_ms must be 0..60000 (0: every update)")
    rate_limit = options.get("rate_limit")
    if rate_limit is not None:
        try:
            check_rate(rate_limit, f"{where} rate_limit")
        except ValueError as exc:
            raise NamespaceError(str(exc)) from None
    return Namespace(
        name=name,
        kind=kind,
        client_publish=options.get("client_publish", True),
        presence=options.get("presence", True),
        conflate_ms=conflate_ms,
        rate_limit=rate_limit,
        publish_hook=options.get("publish_hook", True),
    )
