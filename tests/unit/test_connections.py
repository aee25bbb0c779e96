"""A connection's setup and teardown (chat_gateway.transports.connections), and the gateway's parts
before start: each step done once, undone once, whatever point it got to."""

from __future__ import annotations

import pytest

from chat_gateway.access.auth import Identity
from chat_gateway.config import Settings
from chat_gateway.delivery.hub import SSE, Subscriber
from chat_gateway.errors import ApiError
from chat_gateway.gateway import Gateway, NotStarted
from chat_gateway.transports.connections import Connection


def settings(tmp_path, **overrides) -> Settings:
    return Settings.from_env(
        {}, database_url=f"sqlite:///{tmp_path}/c.db", redis_url="memory://", **overrides
    )


def gauge(gw: Gateway, transport: str) -> float:
    return gw.metrics.connections.labels(transport)._value.get()


async def test_a_part_used_before_start_says_which_and_why(tmp_path):
    gw = Gateway(settings(tmp_path))
    for part in ("hub", "history", "presence", "control", "chat", "limiter"):
        with pytest.raises(NotStarted, match="before the gateway was started"):
            getattr(gw, part)


async def test_a_connection_is_counted_while_open_and_undone_once(tmp_path):
    gw = Gateway(settings(tmp_path, max_connections_per_identity=1, presence_debounce=0.0))
    await gw.start()
    try:
        conn = Connection(gw.services, "ana")
        await conn.admit()
        with pytest.raises(ApiError) as refused:  # the identity's one place is taken
            await Connection(gw.services, "ana").admit()
        assert refused.value.code == "too_many_connections"

        sub = Subscriber(SSE, identity="ana", user="ana")
        conn.attach(sub, Identity("ana"), room="r")
        await gw.hub.subscribe(sub, "r", None)
        await gw.presence.joined(sub.id, "ana", "r")
        assert gw.hub.of_user("ana") == [sub] and gw.hub.connections() == 1
        assert gauge(gw, SSE) == 1
        assert await gw.presence.members("r") == ["ana"]

        await conn.close()
        await conn.close()  # nothing more to undo: no count goes below zero
        assert gw.hub.connections() == 0 and "r" not in gw.hub.held_rooms()
        assert gauge(gw, SSE) == 0
        assert gw.limits.count == 0 and not gw.limits.by_identity
        assert await gw.presence.members("r") == []
        await Connection(gw.services, "ana").admit()  # the place was given back
    finally:
        await gw.close()


async def test_a_connection_refused_while_shutting_down_takes_nothing(tmp_path):
    gw = Gateway(settings(tmp_path))
    await gw.start()
    try:
        gw.closing = True
        conn = Connection(gw.services, "ana")
        with pytest.raises(ApiError) as refused:
            await conn.admit()
        assert refused.value.code == "unavailable" and refused.value.status == 503
        assert gw.limits.count == 0
        await conn.close()  # closing what was never admitted gives nothing back
        assert gw.limits.count == 0
    finally:
        await gw.close()
