"""Versioned SQL migrations, one folder per dialect: ``NNNN_name.sql`` applied in order.

Each file runs in one transaction, unless its first line is ``-- migrate: no
transaction`` (``outside_transaction``): then each of its statements (each ends
with ``;`` at the end of a line) runs on its own, as ``CREATE INDEX
CONCURRENTLY`` and a procedure that commits batches need. Such a file must be
safe to run again from the start: its version is recorded only after its last
statement.
"""

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


NO_TRANSACTION = "-- migrate: no transaction"


def outside_transaction(sql: str) -> bool:
    return sql.lstrip().startswith(NO_TRANSACTION)


def statements(sql: str) -> list[str]:
    """A no-transaction file's statements: each ends with ``;`` at a line's end."""
    out: list[str] = []
    current: list[str] = []
    for line in sql.splitlines():
        if line.lstrip().startswith("--") and not current:
            continue
        current.append(line)
        if line.rstrip().endswith(";"):
            out.append("\n".join(current).strip())
            current = []
    if "\n".join(current).strip():
        out.append("\n".join(current).strip())
    return out
