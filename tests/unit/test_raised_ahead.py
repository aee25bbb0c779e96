"""Which write each publish of a batch raises its room's seq key to
(chat_gateway.delivery.publisher.raised_ahead): one raise per room, to the room's
newest write of the batch, ahead of the room's first publish."""

from __future__ import annotations

from typing import NamedTuple

from chat_gateway.delivery.publisher import raised_ahead


class W(NamedTuple):
    room: str
    seq: int


def test_each_room_is_raised_once_to_its_newest_write_ahead_of_its_first() -> None:
    written = [W("a", 4), W("b", 9), W("a", 5), W("a", 6), W("b", 10), W("c", 1)]
    assert raised_ahead(written) == [W("a", 6), W("b", 10), None, None, None, W("c", 1)]


def test_a_batch_out_of_seq_order_still_raises_to_the_newest() -> None:
    assert raised_ahead([W("a", 7), W("a", 3)]) == [W("a", 7), None]
    assert raised_ahead([W("a", 1)]) == [W("a", 1)]
    assert raised_ahead([]) == []
