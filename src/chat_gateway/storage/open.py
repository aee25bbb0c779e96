"""The store for a ``DATABASE_URL``."""

from __future__ import annotations

from typing import Any

from chat_gateway.storage.base import Store


def create_store(url: str, **options: Any) -> Store:
    """Pick the implementation by URL; the driver is imported only in its branch."""
    if url.startswith(("postgres://", "postgresql://")):
        from chat_gateway.storage.postgres import PostgresStore

        return PostgresStore(url, **options)
    if url.startswith("sqlite://"):
        from chat_gateway.storage.sqlite import SQLiteStore

        return SQLiteStore(url, **options)
    raise ValueError(f"unsupported DATABASE_URL {url!r}: use postgresql://… or sqlite:///PATH")
