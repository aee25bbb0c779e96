"""Redis URLs (chat_gateway.redisio.urls): what a Sentinel or a Cluster URL names, and
the mistakes in one that are refused with a sentence."""

from __future__ import annotations

import pytest

from chat_gateway.config import ConfigError, Settings
from chat_gateway.pubsub import create_broker
from chat_gateway.pubsub.cluster import ClusterBroker
from chat_gateway.pubsub.redis import RedisBroker
from chat_gateway.redisio.urls import parse_cluster_url, parse_sentinel_url


def test_sentinel_urls_name_the_sentinels_service_db_and_credentials():
    assert parse_sentinel_url("redis+sentinel://s1:26380,s2,[::1]:26381/chat") == (
        [("s1", 26380), ("s2", 26379), ("::1", 26381)],
        "chat",
        {"ssl": False, "db": 0},
    )
    assert parse_sentinel_url("rediss+sentinel://ana:p%40ss@s1:1/my%20svc/3") == (
        [("s1", 1)],
        "my svc",
        {"ssl": True, "db": 3, "username": "ana", "password": "p@ss"},
    )
    assert parse_sentinel_url("redis+sentinel://:secret@s1:1/chat")[2]["password"] == "secret"
    assert isinstance(create_broker("redis+sentinel://s1:1/chat"), RedisBroker)
    for bad, why in (
        ("redis+sentinel://s1:1", "service name"),
        ("redis+sentinel://s1:1/", "service name"),
        ("redis+sentinel:///chat", "at least one sentinel"),
        ("redis+sentinel://s1:1/chat/x", "must be a number"),
        ("redis+sentinel://s1:1/chat?db=1", "query options"),
    ):
        with pytest.raises(ConfigError, match=why):
            Settings(redis_url=bad).validated()
    assert Settings(redis_url="rediss+sentinel://s1:1,s2:2/chat/1").validated()


def test_cluster_urls_name_the_startup_nodes_and_credentials():
    assert parse_cluster_url("redis+cluster://127.0.0.1:7000,127.0.0.1:7001") == (
        [("127.0.0.1", 7000), ("127.0.0.1", 7001)],
        {"ssl": False},
    )
    assert parse_cluster_url("rediss+cluster://u:p%40ss@[::1]:7000/0") == (
        [("::1", 7000)],
        {"ssl": True, "username": "u", "password": "p@ss"},
    )
    assert parse_cluster_url("redis+cluster://secret@h")[0] == [("h", 6379)]
    assert isinstance(create_broker("redis+cluster://127.0.0.1:7000"), ClusterBroker)
    for bad in ("redis+cluster://", "redis+cluster://h:1/3", "redis+cluster://h:1?x=1"):
        with pytest.raises(ValueError):
            parse_cluster_url(bad)
        with pytest.raises(ConfigError):
            Settings.from_env({"REDIS_URL": bad})
    assert Settings.from_env({"REDIS_URL": "redis+cluster://h:1,h:2"}).redis_url.endswith("h:2")
