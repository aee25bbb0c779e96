"""Message storage: the store (Postgres or embedded SQLite), migrations, history cache."""

from storage.base import MAX_PAGE, Message, Page, Store, StoreUnavailable, create_store, new_id
from storage.cache import HistoryCache

__all__ = ["MAX_PAGE", "HistoryCache", "Message", "Page", "Store", "StoreUnavailable",
           "create_store", "new_id"]
