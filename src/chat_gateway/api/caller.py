"""Who is asking: the gateway a request reached, the caller's identity, address and
token, and the name a connection is present under."""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

from starlette.requests import HTTPConnection

from chat_gateway.access.auth import Identity, bearer
from chat_gateway.api.validation import author
from chat_gateway.gateway import Gateway


def gateway_of(conn: HTTPConnection) -> Gateway:
    return conn.app.state.gateway  # type: ignore[no-any-return]


@functools.lru_cache(maxsize=8)
def _networks(trusted: tuple[str, ...]) -> tuple[Any, ...]:
    return tuple(ipaddress.ip_network(t, strict=False) for t in trusted)


def client_address(conn: HTTPConnection, trusted: tuple[str, ...]) -> str:
    """The client IP as the ASGI server reports it; ``X-Forwarded-For`` only from a trusted proxy."""
    peer = conn.client.host if conn.client else "unknown"
    if not trusted:
        return peer
    nets = _networks(trusted)

    def is_trusted(addr: str) -> bool:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            return False
        return any(ip in net for net in nets)

    if not is_trusted(peer):
        return peer
    hops = [h.strip() for h in conn.headers.get("x-forwarded-for", "").split(",") if h.strip()]
    # The rightmost address not itself a trusted proxy is the client.
    for hop in reversed(hops):
        if not is_trusted(hop):
            return hop
    return hops[0] if hops else peer


def token_of(conn: HTTPConnection, *, query_token: bool = False) -> str | None:
    """The user token: the bearer header, else (where browsers cannot set headers) ``?token=``."""
    token = bearer(conn.headers)
    if token is None and query_token:
        token = conn.query_params.get("token")
    return token


def identify(conn: HTTPConnection, *, query_token: bool = False) -> Identity:
    gw = gateway_of(conn)
    return gw.auth.user(
        token_of(conn, query_token=query_token), client_address(conn, gw.settings.trusted_proxies)
    )


def known_user(identity: Identity) -> str | None:
    """The user a request is known to come from: the token's ``sub``; None in open
    mode, where a request names nobody (moderation checks it where a name is given)."""
    return identity.name if identity.user else None


def presence_user(conn: HTTPConnection, identity: Identity) -> str | None:
    """The name a connection is present under: the token's ``sub``, or in open mode
    the optional ``?user=`` query parameter (no parameter: not shown in presence)."""
    given = query_user(conn)  # checked even where it is not used
    return identity.name if identity.user else given


def query_user(conn: HTTPConnection) -> str | None:
    """The ``?user=`` query parameter, checked as an author name (422 otherwise)."""
    raw = conn.query_params.get("user")
    return None if raw is None else author(raw)
