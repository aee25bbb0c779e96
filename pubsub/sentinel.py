"""Redis behind Sentinel: the primary is found through the sentinels.

URL: ``redis+sentinel://[user:password@]host:port[,host:port…]/SERVICE[/DB]``
(``rediss+sentinel://`` for TLS to the sentinels and the servers). The hosts
are sentinels; ``SERVICE`` is the name they monitor the primary under; the
password is the Redis servers' (the sentinels are asked without one).

The broker is the plain :class:`pubsub.redis.RedisBroker`; only its client
differs: redis-py's ``Sentinel.master_for`` pool asks the sentinels for the
primary's address whenever it opens a connection, so every reconnect (the
subscriber link's, a pooled command connection's, the command batch's) lands
on whichever server the sentinels promoted. A connection to a server that was
demoted is dropped on its first ``READONLY`` reply.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from redis.asyncio.sentinel import Sentinel

from pubsub.urls import credentials, hosts

SCHEMES = ("redis+sentinel://", "rediss+sentinel://")


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """``redis+sentinel://[user:pass@]h1:p1,h2:p2/SERVICE[/DB]`` -> (sentinels,
    service name, connection options for the primary)."""
    scheme, _, rest = url.partition("://")
    if scheme + "://" not in SCHEMES:
        raise ValueError(f"not a Redis Sentinel URL: {url!r}")
    if "?" in rest or "#" in rest:
        raise ValueError("REDIS_URL: query options are not supported for redis+sentinel://")
    netloc, _, path = rest.partition("/")
    service, _, db = path.partition("/")
    service = unquote(service)
    if not service:
        raise ValueError(
            "REDIS_URL: redis+sentinel:// needs the service name: "
            "redis+sentinel://host:port,…/SERVICE[/DB]"
        )
    if db and not db.isdigit():
        raise ValueError(f"REDIS_URL: the database must be a number, not {db!r}")
    userinfo, _, host_list = netloc.rpartition("@")
    options: dict[str, Any] = {
        "ssl": scheme == "rediss+sentinel",
        "db": int(db or 0),
        **credentials(userinfo),
    }
    sentinels = hosts(host_list, 26379)
    if not sentinels:
        raise ValueError("REDIS_URL: redis+sentinel:// needs at least one sentinel host:port")
    return sentinels, service, options


def sentinel_client(url: str, **connection: Any) -> tuple[Sentinel, Any]:
    """The Sentinel manager and a client of the current primary (no I/O yet).
    ``connection`` (timeouts, retry) applies to the primary's connections; the
    sentinels get the same socket timeouts and TLS."""
    sentinels, service, options = parse_sentinel_url(url)
    sentinel_kwargs = {k: v for k, v in connection.items() if k.startswith("socket_")}
    sentinel_kwargs["ssl"] = options["ssl"]
    manager = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
    return manager, manager.master_for(service, **connection, **options)
