"""Where a webhook may go: http(s) URLs, and by default only public addresses.

A receiver URL is checked when the configuration is read (a literal private
address is refused at once) and again at every attempt: the host name is
resolved, every address it resolves to must be public, and the request is sent
to the address that was checked (the host name still goes in ``Host`` and, for
https, in SNI and the certificate check), so a name that resolves to a public
address for the check cannot point somewhere private for the send.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx


class Blocked(Exception):
    """The receiver's address is not allowed (loopback, private, link-local...)."""


# IPv6 prefixes whose last 32 bits are an IPv4 address a translator or the host
# itself reaches: NAT64's well-known prefix (RFC 6052), IPv4-compatible (::a.b.c.d,
# deprecated but still routed by some stacks) and IPv4-translated (RFC 2765).
_EMBEDDING = tuple(ipaddress.ip_network(n) for n in ("64:ff9b::/96", "::/96", "::ffff:0:0:0/96"))
# NAT64 for a local network (RFC 8215): never a public destination.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries and leads to: IPv4-mapped,
    NAT64, IPv4-compatible and -translated forms, 6to4 (2002::/16) and both
    ends of Teredo (2001::/32)."""
    if ip.ipv4_mapped is not None:
        return [ip.ipv4_mapped]
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)
    if any(ip in net for net in _EMBEDDING):
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return []


def refused(address: str) -> bool:
    """True for an address a webhook must not reach without WEBHOOK_ALLOW_PRIVATE:
    one that is not public itself, or an IPv6 form of a non-public IPv4 address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _LOCAL_NAT64:
            return True
        candidates += embedded_ipv4(ip)
    return any(not a.is_global or a.is_multicast for a in candidates)


def origin(url: httpx.URL) -> str:
    """``host`` or ``host:port`` of a receiver URL: what logs, errors and metrics
    may show of it. Slack- and Discord-style URLs carry their secret in the path,
    others in the query; neither is shown."""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return host if url.port is None else f"{host}:{url.port}"


def check_url(url: str, *, allow_private: bool) -> httpx.URL:
    """The URL parsed; ``ValueError`` for one no webhook may be sent to. The
    message names the receiver by its scheme and origin, never its path."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        raise ValueError("an entry is not a URL") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(
            f"{parsed.scheme or 'an entry'}://…: a receiver needs an http:// or "
            "https:// URL with a host"
        )
    shown = f"{parsed.scheme}://{origin(parsed)}/…"
    if parsed.userinfo:
        raise ValueError(f"{shown}: credentials in the URL are not supported")
    if not allow_private:
        try:
            literal = ipaddress.ip_address(parsed.host)
        except ValueError:
            literal = None
        if literal is not None and refused(str(literal)):
            raise ValueError(
                f"{shown} is a private or loopback address; set "
                "WEBHOOK_ALLOW_PRIVATE=true to allow it"
            )
    return parsed


@dataclass(frozen=True, slots=True)
class Target:
    """What one attempt sends to: the URL, and the Host/SNI that go with it."""

    url: httpx.URL
    headers: dict[str, str] = field(default_factory=dict)
    extensions: dict[str, Any] = field(default_factory=dict)


async def target(url: httpx.URL, *, allow_private: bool) -> Target:
    """Where to send now. Without ``allow_private`` the host is resolved here, every
    address checked, and the request pinned to the first one; ``Blocked`` if any
    address is not public."""
    if allow_private:
        return Target(url)
    host = url.host
    port = url.port or (443 if url.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise httpx.ConnectError(f"cannot resolve {host}: {exc}") from None
    addresses = [str(info[4][0]) for info in infos]
    bad = [a for a in addresses if refused(a)]
    if bad or not addresses:
        raise Blocked(f"{host} resolves to a non-public address ({', '.join(bad) or 'none'})")
    address = addresses[0]
    pinned = url.copy_with(host=address)
    netloc = host if url.port is None else f"{host}:{url.port}"
    extensions = {"sni_hostname": host} if url.scheme == "https" else {}
    return Target(pinned, {"host": netloc}, extensions)


@asynccontextmanager
async def post(
    client: httpx.AsyncClient,
    url: httpx.URL,
    body: bytes,
    headers: dict[str, str],
    *,
    allow_private: bool,
) -> AsyncIterator[httpx.Response]:
    """POST ``body`` to ``url`` pinned to its checked address (:func:`target`), the
    response streamed: the webhooks' and the publish hook's one way out."""
    where = await target(url, allow_private=allow_private)
    async with client.stream(
        "POST",
        where.url,
        content=body,
        headers={**headers, **where.headers},
        extensions=where.extensions,
    ) as response:
        yield response
