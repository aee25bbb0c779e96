"""Who is asking: the services of the gateway a request reached, the caller's identity, address and
token, and the name a connection is present under."""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

from starlette.requests import HTTPConnection

from chat_gateway.access.auth import Identity, bearer, is_api_key, key_bucket
from chat_gateway.api.validation import author
from chat_gateway.core.namespaces import RoomKind
from chat_gateway.errors import ApiError, wrong_room_kind
from chat_gateway.services import Services


def services_of(conn: HTTPConnection) -> Services:
    """The started parts of the gateway ``conn`` reached (chat_gateway.services)."""
    return conn.app.state.services  # type: ignore[no-any-return]


gateway_of = services_of  # the name routes have always reached the gateway by


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


# Where the app leaves what the session hook said of a request with no token but a
# cookie (chat_gateway.server.app.GatewayApp): an Identity, or the ApiError refusing it.
SESSION = "chat_gateway.session"


def identify(conn: HTTPConnection, *, query_token: bool = False) -> Identity:
    """The caller: the bearer token's (or ``?token=``'s), else the application
    session's the session hook answered for, else (open mode) the client address."""
    gw = gateway_of(conn)
    token = token_of(conn, query_token=query_token)
    if token is None:
        session = conn.scope.get(SESSION)
        if isinstance(session, Identity):
            return session
        if isinstance(session, ApiError):
            raise ApiError(session.code, session.message)
    return gw.auth.user(token, client_address(conn, gw.settings.trusted_proxies))


def stored_room(gw: Services, room: str, operation: str) -> None:
    """Refuse (409 ``wrong_room_kind``) an operation on stored messages in a room
    whose namespace stores none (``NAMESPACES_FILE``)."""
    kind = gw.settings.namespaces_file.of(room).kind
    if kind is not RoomKind.STORED:
        raise wrong_room_kind(room, kind.value, operation)


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


def api_key(conn: HTTPConnection) -> str | None:
    """The bearer header if it is one of ``API_KEYS`` (none configured: never)."""
    key = bearer(conn.headers)
    return key if is_api_key(services_of(conn).auth, key) else None


def key_caller(conn: HTTPConnection, key: str | None) -> str:
    """The rate bucket of a caller let in by an API key (``key``, already checked):
    one per key, named by a digest (no secret in Redis); with no key configured
    (open mode), one per client address. The one policy every API-key route and
    stream counts by."""
    services = services_of(conn)
    if services.auth.keys_required and key:
        return key_bucket(key)
    return client_address(conn, services.settings.trusted_proxies)
