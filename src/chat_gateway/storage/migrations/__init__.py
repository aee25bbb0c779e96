"""Versioned SQL migrations, one folder per dialect: ``NNNN_name.sql`` applied in order."""

from __future__ import annotations

from importlib import resources


def load(dialect: str) -> list[tuple[str, str]]:
    """(version, sql) pairs for ``dialect`` in version order."""
    folder = resources.files(__name__).joinpath(dialect)
    out = []
    for entry in folder.iterdir():
        if entry.name.endswith(".sql"):
            out.append((entry.name[:-4], entry.read_text(encoding="utf-8")))
    return sorted(out)
