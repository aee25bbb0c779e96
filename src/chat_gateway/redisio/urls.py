"""Redis URLs read: which kind of Redis a URL names, and the pieces of the
multi-host ones (``redis+cluster://``, ``redis+sentinel://``)."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

PLAIN_SCHEMES = ("redis://", "rediss://", "unix://")
SENTINEL_SCHEMES = ("redis+sentinel://", "rediss+sentinel://")
CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")


def redis_address(url: str) -> str:
    """Where a one-server Redis URL points, for a log line: ``host:port`` or a socket's path."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}"


def credentials(userinfo: str) -> dict[str, Any]:
    """``user:password`` or ``password`` (as in ``redis://``) as connection options."""
    if not userinfo:
        return {}
    user, colon, password = userinfo.partition(":")
    if colon:
        return {"username": unquote(user) or None, "password": unquote(password)}
    return {"password": unquote(user)}


def hosts(text: str, default_port: int) -> list[tuple[str, int]]:
    """``h1:p1,h2,[::1]:p3`` as ``(host, port)`` pairs; a host without a port gets
    ``default_port``."""
    found = []
    for part in filter(None, text.split(",")):
        host, colon, port = part.rpartition(":")
        if not colon or not port.isdigit():
            host, port = part, str(default_port)
        found.append((host.strip("[]"), int(port)))
    return found


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``redis+cluster://[user:pass@]h1:p1,h2:p2[/0]`` -> (startup nodes, connection options)."""
    scheme, _, rest = url.partition("://")
    if scheme + "://" not in CLUSTER_SCHEMES:
        raise ValueError(f"not a Redis Cluster URL: {url!r}")
    if "?" in rest:
        raise ValueError("REDIS_URL: query options are not supported for redis+cluster://")
    netloc, _, path = rest.partition("/")
    if path not in ("", "0"):
        raise ValueError("REDIS_URL: a Redis Cluster has only database 0")
    userinfo, _, host_list = netloc.rpartition("@")
    options: dict[str, Any] = {"ssl": scheme == "rediss+cluster", **credentials(userinfo)}
    nodes = hosts(host_list, 6379)
    if not nodes:
        raise ValueError("REDIS_URL: redis+cluster:// needs at least one host:port")
    return nodes, options


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """``redis+sentinel://[user:pass@]h1:p1,h2:p2/SERVICE[/DB]`` -> (sentinels,
    service name, connection options for the primary)."""
    scheme, _, rest = url.partition("://")
    if scheme + "://" not in SENTINEL_SCHEMES:
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
