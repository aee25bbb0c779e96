"""Message storage: the store (Postgres or embedded SQLite), migrations, history cache."""

from chat_gateway.storage.base import (
    MAX_PAGE,
    Change,
    Message,
    MessageDeleted,
    MessageNotFound,
    NotAuthor,
    Page,
    ReadPosition,
    RoomFilter,
    Store,
    StoreUnavailable,
    Version,
    new_id,
)
from chat_gateway.storage.cache import HistoryCache, RedisHistoryCache
from chat_gateway.storage.open import create_store

__all__ = [
    "MAX_PAGE",
    "Change",
    "HistoryCache",
    "RedisHistoryCache",
    "Message",
    "MessageDeleted",
    "MessageNotFound",
    "NotAuthor",
    "Page",
    "ReadPosition",
    "RoomFilter",
    "Store",
    "StoreUnavailable",
    "Version",
    "create_store",
    "new_id",
]
