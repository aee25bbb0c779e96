"""What ``chat-gateway --help`` and ``--version`` say.

The variables are the fields of :class:`chat_gateway.config.Settings` (``env_names``)
with their defaults; each one's meaning is its row in the README's
"Configuration" table, the one place they are described (tests/unit/test_deploy.py
keeps it whole), read from the checkout or else from the installed package's
metadata, which carries the README.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import MISSING, fields
from importlib import metadata
from pathlib import Path
from typing import Any

from chat_gateway.config import Settings, env_names

DIST = "chat-gateway"
# Test-only hooks are settings too, but nothing an operator should set.
HIDDEN_PREFIX = "FAULT_"
_ROW = re.compile(r"^\|\s*(`[A-Z0-9_]+`(?:\s*/\s*`[A-Z0-9_]+`)*)\s*\|[^|]*\|\s*(.+?)\s*\|\s*$")


def version() -> str:
    try:
        return metadata.version(DIST)
    except metadata.PackageNotFoundError:
        return "unknown (not installed)"


def summary() -> str:
    try:
        return metadata.metadata(DIST)["Summary"] or ""
    except metadata.PackageNotFoundError:
        return ""


def _readme() -> str:
    checkout = Path(__file__).resolve().parents[3] / "README.md"
    if checkout.is_file():
        return checkout.read_text(encoding="utf-8")
    try:
        return metadata.metadata(DIST)["Description"] or ""
    except metadata.PackageNotFoundError:
        return ""


def rows(readme: str) -> dict[str, tuple[tuple[str, ...], str]]:
    """NAME -> (the names its row describes together, the row's meaning) for every
    ``| `NAME` | default | meaning |`` row (``| `A` / `B` | … |`` describes two),
    markdown and parenthetical remarks left out."""
    out: dict[str, tuple[tuple[str, ...], str]] = {}
    for line in readme.splitlines():
        m = _ROW.match(line)
        if not m:
            continue
        text = re.sub(r"\s*\([^()]*\)", "", m.group(2).replace("`", "")).strip()
        names = tuple(re.findall(r"`([A-Z0-9_]+)`", m.group(1)))
        for name in names:
            out.setdefault(name, (names, text))
    return out


def _default(f: Any) -> str:
    value = f.default if f.default is not MISSING else f.default_factory()
    if value is None or value == ():
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def environment_help(width: int = 79) -> str:
    """Every variable the gateway reads, with its default and meaning, grouped as
    the README groups them."""
    described = rows(_readme())
    settings = {f.name.upper(): f for f in fields(Settings)}
    names = env_names()
    lines = [
        "environment (a flag of serve overrides its variable; README.md,",
        '"Configuration", says more):',
    ]
    done: set[str] = set()
    for name in settings:
        if name in done or name not in names or name.startswith(HIDDEN_PREFIX):
            continue
        group, text = described.get(name, ((name,), ""))
        group = tuple(n for n in group if n in names and n not in done) or (name,)
        done.update(group)
        defaults = ", ".join(_default(settings[n]) for n in group)
        lines.append("  " + ", ".join(group))
        lines.append(
            textwrap.fill(
                f"{text} [default: {defaults}]".lstrip(),
                width,
                initial_indent=" " * 6,
                subsequent_indent=" " * 6,
            )
        )
    return "\n".join(lines)
