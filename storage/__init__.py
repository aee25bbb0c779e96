"""Message storage: the store (Postgres or embedded SQLite), migrations, history cache."""

from storage.base import (
    MAX_PAGE,
    Change,
    Message,
    MessageNotFound,
    NotAuthor,
    Page,
    ReadPosition,
    Store,
    StoreUnavailable,
    new_id,
)
from storage.cache import HistoryCache
from storage.open import create_store

__all__ = [
    "MAX_PAGE",
    "Change",
    "HistoryCache",
    "Message",
    "MessageNotFound",
    "NotAuthor",
    "Page",
    "ReadPosition",
    "Store",
    "StoreUnavailable",
    "create_store",
    "new_id",
]
