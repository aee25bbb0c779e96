"""Conflation, without I/O: the newest update per key, waiting for its interval.

A subscriber of a state or ephemeral room may ask for ``conflate_ms``: at most one
frame per key per interval, always the newest. Every subscriber of a room on an
instance with the same interval shares one :class:`ConflationBuffer` (and the
hub one timer for it), so an update costs one dictionary write however many
subscribers wait for it, and a flush encodes each frame once for all of them
(chat_gateway.delivery.hub).

The buffer keeps each key's newest item in the order of its newest update: an
update of a key already held replaces it and moves it last. Fed in seq order,
:meth:`take` therefore answers items in seq order, each key once, so a
subscriber never receives an older value of a key after a newer one.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class ConflationBuffer(Generic[T]):
    """Key -> newest item, in the order of each key's newest update."""

    __slots__ = ("_items", "updates")

    def __init__(self) -> None:
        self._items: dict[str, T] = {}
        self.updates = 0  # updates taken in since the last take (figures, tests)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, key: str, item: T) -> bool:
        """Hold ``item`` as ``key``'s newest (it must be newer than the one held).
        True when the buffer was empty: the caller arms the interval's timer."""
        items = self._items
        first = not items
        items.pop(key, None)
        items[key] = item
        self.updates += 1
        return first

    def take(self) -> list[T]:
        """Everything held, oldest update first; the buffer is empty after."""
        items = list(self._items.values())
        self._items.clear()
        self.updates = 0
        return items
