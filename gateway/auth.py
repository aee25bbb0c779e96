"""Identity: HS256 user tokens (PyJWT) and API keys for backend publishers."""

from __future__ import annotations

import hmac
import warnings
from dataclasses import dataclass
from typing import Any

import jwt
from jwt.warnings import InsecureKeyLengthWarning

from gateway.errors import ApiError


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: a token's ``sub`` (``user=True``) or a client address."""

    name: str
    user: bool = False
    rooms: tuple[str, ...] | None = None  # None: every room
    expires_at: float | None = None  # epoch seconds (exp plus the leeway); None: never

    def may_access(self, room: str) -> bool:
        if self.rooms is None:
            return True
        for pattern in self.rooms:
            if pattern.endswith("*"):
                if room.startswith(pattern[:-1]):
                    return True
            elif pattern == room:
                return True
        return False

    def check_room(self, room: str) -> None:
        if not self.may_access(room):
            raise ApiError("forbidden", f"the token does not grant room {room!r}")


class Authenticator:
    def __init__(self, secret: str | None, *, leeway: float = 5.0,
                 api_keys: tuple[str, ...] = ()) -> None:
        self.secret = secret
        self.leeway = leeway
        self._api_keys = [k.encode() for k in api_keys]

    @property
    def open_mode(self) -> bool:
        return not self.secret

    def warnings(self) -> list[str]:
        """What an operator should hear about at start."""
        if self.open_mode:
            return ["open mode: AUTH_SECRET is unset, so anyone may read and post "
                    "in any room under any author name"]
        if len(self.secret.encode()) < 32:  # type: ignore[union-attr]
            return ["AUTH_SECRET is shorter than 32 bytes, below what HS256 needs "
                    "(RFC 7518, section 3.2)"]
        return []

    @property
    def keys_required(self) -> bool:
        return bool(self._api_keys)

    def user(self, token: str | None, fallback: str) -> Identity:
        """The identity for a request: the token's ``sub`` with auth on, else ``fallback``."""
        if self.open_mode:
            return Identity(fallback)
        if not token:
            raise ApiError("unauthorized", "a bearer token is required")
        try:
            with warnings.catch_warnings():
                # A short secret is reported once at start, not on every request.
                warnings.simplefilter("ignore", InsecureKeyLengthWarning)
                claims: dict[str, Any] = jwt.decode(
                    token, self.secret, algorithms=["HS256"], leeway=self.leeway,
                    options={"require": ["sub", "exp"]})
        except jwt.ExpiredSignatureError:
            raise ApiError("unauthorized", "the token has expired") from None
        except jwt.InvalidTokenError as exc:
            raise ApiError("unauthorized", f"the token is not valid: {exc}") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub or len(sub) > 128:
            raise ApiError("unauthorized", "the token's sub must be a string of 1..128 characters")
        rooms = claims.get("rooms")
        if rooms is not None:
            if not isinstance(rooms, list) or not all(isinstance(x, str) for x in rooms):
                raise ApiError("unauthorized", "the token's rooms claim must be a list of strings")
            rooms = tuple(rooms)
        exp = claims["exp"]
        expires_at = float(exp) + self.leeway if isinstance(exp, (int, float)) else None
        return Identity(sub, user=True, rooms=rooms, expires_at=expires_at)

    def check_api_key(self, key: str | None) -> None:
        if not self._api_keys:
            return
        if not key:
            raise ApiError("unauthorized", "an API key is required: Authorization: Bearer <key>")
        given = key.encode()
        ok = False
        for candidate in self._api_keys:  # every key compared, in constant time
            ok |= hmac.compare_digest(given, candidate)
        if not ok:
            raise ApiError("unauthorized", "the API key is not valid")


def is_api_key(auth: Authenticator, key: str | None) -> bool:
    """Whether ``key`` is one of the configured API keys (none configured: never)."""
    if not auth.keys_required or not key:
        return False
    try:
        auth.check_api_key(key)
    except ApiError:
        return False
    return True


def bearer(headers: Any) -> str | None:
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


__all__ = ["Authenticator", "Identity", "bearer"]
