"""The in-process broker (chat_gateway.pubsub.memory): the batched publish every broker
offers (chat_gateway.pubsub.base.Broker.publish_batch), in order."""

from __future__ import annotations

import pytest

from chat_gateway.pubsub import BrokerUnavailable, Sent
from chat_gateway.pubsub.memory import MemoryBroker
from tests.harness import eventually


async def test_the_memory_broker_publishes_a_batch_in_order():
    broker = MemoryBroker()
    got: list[tuple[str, bytes]] = []
    broker.on_message(lambda channel, data: got.append((channel, data)))
    # Not started: every message is reported lost, none raised.
    lost = await broker.publish_batch([("a", b"1"), ("b", b"2")])
    assert [type(s.lost) for s in lost] == [BrokerUnavailable, BrokerUnavailable]
    await broker.start()
    try:
        await broker.subscribe("a")
        sent = await broker.publish_batch([("a", b"1"), ("b", b"x"), ("a", b"2")])
        assert sent == [Sent(None, None)] * 3
        await eventually(lambda: len(got) == 2)
        assert got == [("a", b"1"), ("a", b"2")]  # in order; "b" has no subscriber
        assert not broker.carries(None)
        with pytest.raises(ValueError):
            await broker.publish_batch([("a", b"3")], ahead=[("INCR", "k")])
    finally:
        await broker.close()
