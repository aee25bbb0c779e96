"""Identity: user tokens (JWT, verified with PyJWT) and API keys for backend publishers.

A user token is verified with one of three kinds of key, chosen by the token's
``alg`` header and never by the token alone:

- ``HS256`` with the shared secret(s) of ``AUTH_SECRET`` (several for rotation);
- an asymmetric algorithm with the identity provider's key named by the token's
  ``kid``, from the JWKS at ``AUTH_JWKS_URL`` (:class:`JwksKeys`), or with the one
  PEM key of ``AUTH_PUBLIC_KEY``.

Each public key verifies only the algorithms its type allows (RSA: RS256/384/512,
EC P-256: ES256, EC P-384: ES384, Ed25519: EdDSA), so ``none`` and an HMAC token
"signed" with a public key are refused, whatever the header says.

Verification is synchronous and uses cached keys only. A token naming a ``kid``
the cache does not hold is held before its route (:meth:`Authenticator.await_key`)
until the next fetch of the key set, at most one every ``AUTH_JWKS_MIN_INTERVAL``
seconds whatever the traffic; a failed fetch keeps the keys already known.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import orjson
from jwt.warnings import InsecureKeyLengthWarning

from chat_gateway.config import Settings
from chat_gateway.core.public_keys import (
    ASYMMETRIC_ALGORITHMS,
    PublicKey,
    load_public_key,
    pinned_algorithms,
)
from chat_gateway.core.text import flaw
from chat_gateway.errors import ApiError
from chat_gateway.periodic import every
from chat_gateway.storage import RoomFilter

log = logging.getLogger("gateway.auth")

HMAC_ALGORITHM = "HS256"
# A key set larger than this, or listing more keys, is refused as a failed fetch
# (the keys known before are kept): providers publish a handful, and parsing
# thousands of RSA keys costs seconds of CPU.
MAX_JWKS_BYTES = 1024 * 1024
MAX_JWKS_KEYS = 100


def _matches(patterns: tuple[str, ...] | None, room: str) -> bool:
    if patterns is None:
        return False
    for pattern in patterns:
        if pattern.endswith("*"):
            if room.startswith(pattern[:-1]):
                return True
        elif pattern == room:
            return True
    return False


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is calling: a token's ``sub`` (``user=True``) or a client address.

    ``rooms`` grants reading and posting, ``read_rooms`` reading only (history,
    SSE, subscribe); both hold names or ``prefix:*`` patterns. With neither claim
    every room is granted; once either is present, only what they list, and a
    room ``read_rooms`` matches is read-only even where ``rooms`` matches too.
    ``moderate`` (same patterns) lists the rooms where the holder may edit and
    delete anyone's message, in a room it may also read; absent: none.
    """

    name: str
    user: bool = False
    rooms: tuple[str, ...] | None = None  # None: see the class docstring
    expires_at: float | None = None  # epoch seconds (exp plus the leeway); None: never
    read_rooms: tuple[str, ...] | None = None
    exp: float | None = None  # the token's own exp claim
    moderate: tuple[str, ...] | None = None

    @property
    def unrestricted(self) -> bool:
        return self.rooms is None and self.read_rooms is None

    @property
    def bucket(self) -> str:
        """The name this identity's rate buckets and connection counts go under:
        ``user:<sub>`` for a token, the client address otherwise. An API key's is
        ``key:<digest>`` (:func:`key_bucket`), so no ``sub`` can share a key's."""
        return "user:" + self.name if self.user else self.name

    def readable(self) -> RoomFilter | None:
        """The rooms this identity may read as a store filter (None: every room)."""
        if self.unrestricted:
            return None
        patterns = (*(self.rooms or ()), *(self.read_rooms or ()))
        return RoomFilter(
            names=tuple(p for p in patterns if not p.endswith("*")),
            prefixes=tuple(p[:-1] for p in patterns if p.endswith("*")),
        )

    def may_access(self, room: str) -> bool:
        """May read ``room`` (history, SSE, subscribe, presence)."""
        return self.unrestricted or _matches(self.rooms, room) or _matches(self.read_rooms, room)

    def may_post(self, room: str) -> bool:
        if self.unrestricted:
            return True
        return _matches(self.rooms, room) and not _matches(self.read_rooms, room)

    def may_moderate(self, room: str) -> bool:
        """May edit and delete anyone's message in ``room``."""
        return _matches(self.moderate, room) and self.may_access(room)

    def check_room(self, room: str) -> None:
        """Refuse (403) unless the identity may read ``room``."""
        if not self.may_access(room):
            raise ApiError("forbidden", f"the token does not grant room {room!r}")

    def check_post(self, room: str) -> None:
        """Refuse (403) unless the identity may post in ``room``."""
        if self.may_post(room):
            return
        if self.may_access(room):
            raise ApiError("forbidden", f"the token grants room {room!r} read-only")
        raise ApiError("forbidden", f"the token does not grant room {room!r}")


def claims_identity(claims: dict[str, Any], leeway: float, source: str = "token") -> Identity:
    """The identity a token's verified claims, or a session hook's answer, give: ``sub``
    (1..128 characters, not all blank, no control characters: it becomes the author of
    what it posts), ``exp`` (a number), ``rooms``, ``read_rooms`` and ``moderate`` (lists
    of strings). Refused (401) otherwise, the message naming ``source``."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub.strip() or len(sub) > 128:
        raise ApiError(
            "unauthorized",
            f"the {source}'s sub must be a string of 1..128 characters, not all blank",
        )
    problem = flaw(sub)
    if problem is not None:
        raise ApiError("unauthorized", f"the {source}'s sub {problem}")
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not math.isfinite(exp):
        raise ApiError(
            "unauthorized", f"the {source}'s exp must be a number (seconds since 1970-01-01 UTC)"
        )

    def patterns(name: str) -> tuple[str, ...] | None:
        value = claims.get(name)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(x, str) for x in value):
            raise ApiError("unauthorized", f"the {source}'s {name} claim must be a list of strings")
        return tuple(value)

    return Identity(
        sub,
        user=True,
        rooms=patterns("rooms"),
        read_rooms=patterns("read_rooms"),
        moderate=patterns("moderate"),
        expires_at=float(exp) + leeway,
        exp=exp,
    )


class JwksKeys:
    """The identity provider's signing keys, fetched from its JWKS and kept by ``kid``.

    The set is fetched at start, every ``refresh`` seconds, and when a token names
    a ``kid`` it does not hold; never twice within ``min_interval`` seconds (a flood
    of made-up kids costs the provider one fetch per interval). A fetch reads at
    most ``MAX_JWKS_BYTES`` (httpx, on the loop) and the keys, at most
    ``MAX_JWKS_KEYS``, are parsed on a worker thread. A fetch that fails keeps the
    keys already known. Only https is fetched (every redirect too) unless
    ``allow_http``.
    """

    def __init__(
        self,
        url: str,
        *,
        refresh: float = 300.0,
        min_interval: float = 5.0,
        timeout: float = 5.0,
        allow_http: bool = False,
    ) -> None:
        self.url = url
        self.refresh_interval = refresh
        self.min_interval = min_interval
        self.timeout = timeout
        self.allow_http = allow_http
        self.keys: dict[str, PublicKey] = {}
        self._http: httpx.AsyncClient | None = None
        self._last_fetch = -math.inf  # monotonic time the last fetch started
        self._fetch: asyncio.Task[None] | None = None
        self._periodic: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self) -> None:
        await self.fetch()
        if not self.keys:
            log.warning(
                "no signing keys from AUTH_JWKS_URL %s yet: tokens are refused until "
                "a fetch succeeds (retried on the next token, at most every %g s)",
                self.url,
                self.min_interval,
            )
        self._periodic = every(self.refresh_interval, self._refresh, "JWKS refresh")

    async def close(self) -> None:
        for task in (self._periodic, self._fetch):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    async def _refresh(self) -> None:
        if time.monotonic() - self._last_fetch >= self.min_interval:
            await self.fetch()

    def get(self, kid: Any) -> PublicKey | None:
        return self.keys.get(kid) if isinstance(kid, str) else None

    async def fetch(self) -> None:
        """Fetch the set now, or join the fetch already under way."""
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.create_task(self._fetch_once(), name="JWKS fetch")
        await asyncio.shield(self._fetch)

    async def await_kid(self, kid: str) -> None:
        """Return once ``kid`` is known, or once a fetch that started after this call has
        ended without it. That fetch starts when ``min_interval`` has passed since the
        last one, and every caller waiting meanwhile shares it."""
        arrived = time.monotonic()
        while kid not in self.keys:
            if self._fetch is not None and not self._fetch.done():
                await asyncio.shield(self._fetch)
            elif self._last_fetch >= arrived:
                return
            elif (wait := self._last_fetch + self.min_interval - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            else:
                await self.fetch()

    async def _fetch_once(self) -> None:
        self._last_fetch = time.monotonic()
        try:
            body = await asyncio.wait_for(self._download(), self.timeout + 1)
            keys = await asyncio.to_thread(self._parse, body)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if not self._failing:
                log.warning(
                    "fetching the signing keys from %s failed, keeping the keys "
                    "fetched before (%d): %s",
                    self.url,
                    len(self.keys),
                    exc,
                )
            self._failing = True
            return
        if self._failing:
            log.warning("signing keys fetched from %s again", self.url)
        self._failing = False
        if set(keys) != set(self.keys):
            log.info(
                "signing keys from %s: %d (%d new, %d gone)",
                self.url,
                len(keys),
                len(set(keys) - set(self.keys)),
                len(set(self.keys) - set(keys)),
            )
        self.keys = keys

    async def _download(self) -> bytes:
        """The key set's bytes: at most ``MAX_JWKS_BYTES`` (decoded), over https
        unless ``allow_http``."""
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=self.timeout,
                follow_redirects=True,
                headers={"User-Agent": "chat-gateway"},
            )
        async with self._http.stream("GET", self.url) as response:
            if not self.allow_http:
                for hop in (*response.history, response):
                    if hop.url.scheme != "https":
                        raise ValueError(f"refused to fetch keys over plain http ({hop.url})")
            response.raise_for_status()
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_JWKS_BYTES:
                raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes ({declared})")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError(f"the JWKS is larger than {MAX_JWKS_BYTES} bytes")
        return bytes(body)

    def _parse(self, body: bytes) -> dict[str, PublicKey]:
        """Signature keys with a ``kid`` and a usable public key; the rest skipped.
        Runs on a worker thread."""
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"the JWKS is not JSON: {exc}") from None
        entries = data.get("keys") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise ValueError("the JWKS has no keys list")
        if len(entries) > MAX_JWKS_KEYS:
            raise ValueError(f"the JWKS lists {len(entries)} keys, more than {MAX_JWKS_KEYS}")
        keys: dict[str, PublicKey] = {}
        for entry in entries:
            if not isinstance(entry, dict):
                continue
            kid = entry.get("kid")
            if (
                not isinstance(kid, str)
                or entry.get("use", "sig") != "sig"
                or entry.get("kty") == "oct"
            ):
                continue  # encryption keys and shared secrets never verify a token
            try:
                key = jwt.PyJWK(entry).key
            except jwt.PyJWTError as exc:
                log.debug("JWKS key %r skipped: %s", kid, exc)
                continue
            algorithms = pinned_algorithms(key)
            declared = entry.get("alg")
            if declared is not None:
                algorithms = tuple(a for a in algorithms if a == declared)
            if algorithms:
                keys[kid] = PublicKey(key, algorithms, kid)
        if not keys:
            raise ValueError(
                "the JWKS holds no usable signature key (RSA, EC P-256/P-384 or Ed25519 with a kid)"
            )
        return keys


_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet (nbf or iat in the future)"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
)


class Authenticator:
    """Verifies user tokens and API keys. Constructing it does no I/O; ``start`` fetches
    the JWKS (from the app's lifespan) and ``close`` stops its refresh."""

    def __init__(
        self,
        secret: str | None = None,
        *,
        leeway: float = 5.0,
        api_keys: tuple[str, ...] = (),
        jwks: JwksKeys | None = None,
        public_key: PublicKey | None = None,
        issuer: str | None = None,
        audience: str | None = None,
        metrics_key: str | None = None,
        sessions: bool = False,
    ) -> None:
        self.sessions = sessions  # AUTH_HOOK_URL: the application's sessions also identify
        self.secrets = tuple((secret or "").split())
        self._metrics_key = metrics_key.encode() if metrics_key else None
        self.leeway = leeway
        self.jwks = jwks
        self.public_key = public_key
        self.issuer = issuer
        self.audience = audience
        self._api_keys = [k.encode() for k in api_keys]
        required = ["sub", "exp"] + (["iss"] if issuer else []) + (["aud"] if audience else [])
        self._options: Any = {"require": required, "verify_aud": audience is not None}

    @classmethod
    def from_settings(cls, s: Settings) -> Authenticator:
        jwks = (
            JwksKeys(
                s.auth_jwks_url,
                refresh=s.auth_jwks_refresh,
                min_interval=s.auth_jwks_min_interval,
                timeout=s.auth_jwks_timeout,
                allow_http=s.auth_jwks_allow_http,
            )
            if s.auth_jwks_url
            else None
        )
        return cls(
            s.auth_secret,
            leeway=s.auth_leeway,
            api_keys=s.api_keys,
            jwks=jwks,
            public_key=load_public_key(s.auth_public_key) if s.auth_public_key else None,
            issuer=s.auth_issuer,
            audience=s.auth_audience,
            metrics_key=s.metrics_key,
            sessions=s.auth_hook_url is not None,
        )

    async def start(self) -> None:
        if self.jwks is not None:
            await self.jwks.start()

    async def close(self) -> None:
        if self.jwks is not None:
            await self.jwks.close()

    @property
    def open_mode(self) -> bool:
        return not (self.secrets or self.jwks or self.public_key or self.sessions)

    def warnings(self) -> list[str]:
        """What an operator should hear about at start."""
        if self.open_mode:
            return [
                "open mode: none of AUTH_SECRET, AUTH_JWKS_URL, AUTH_PUBLIC_KEY, "
                "AUTH_HOOK_URL is set, "
                "so anyone may read and post in any room under any author name"
            ]
        out = []
        if any(len(s.encode()) < 32 for s in self.secrets):
            out.append(
                "an AUTH_SECRET is shorter than 32 bytes, below what HS256 needs "
                "(RFC 7518, section 3.2)"
            )
        if not self._api_keys:
            out.append(
                "API_KEYS is unset: POST /v1/publish refuses every request (401); "
                "set API_KEYS for backend publishers"
            )
        if self.jwks is not None and self.jwks.url.lower().startswith("http://"):
            out.append(
                "AUTH_JWKS_URL is plain http (AUTH_JWKS_ALLOW_HTTP=true): whoever can "
                "alter that traffic can sign tokens the gateway accepts"
            )
        if (self.jwks or self.public_key) and not self.audience:
            out.append(
                "AUTH_AUDIENCE is unset: any token the identity provider signs is "
                "accepted, whichever application it was issued for"
            )
        return out

    @property
    def keys_required(self) -> bool:
        return bool(self._api_keys)

    def unknown_kid(self, token: str | None) -> str | None:
        """The ``kid`` of an asymmetric token whose key the JWKS cache lacks, else None."""
        if self.jwks is None or not token:
            return None
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return None
        kid = header.get("kid")
        if (
            isinstance(kid, str)
            and header.get("alg") in ASYMMETRIC_ALGORITHMS
            and kid not in self.jwks.keys
            and len(kid) <= 256
        ):
            return kid
        return None

    async def await_key(self, token: str | None) -> None:
        """Before ``user`` is called: wait (bounded) for a key the token names and the
        cache lacks; a no-op for every other token."""
        kid = self.unknown_kid(token)
        if kid is not None and self.jwks is not None:
            await self.jwks.await_kid(kid)

    def user(self, token: str | None, fallback: str) -> Identity:
        """The identity for a request: the token's ``sub`` with auth on, else ``fallback``."""
        if self.open_mode:
            return Identity(fallback)
        if not token:
            if self.sessions:
                raise ApiError(
                    "unauthorized", "a bearer token or the application's session cookie is required"
                )
            raise ApiError("unauthorized", "a bearer token is required")
        if not (self.secrets or self.jwks or self.public_key):
            raise ApiError(
                "unauthorized",
                "bearer tokens are not accepted: this gateway identifies users by the "
                "application's sessions (send its cookie, not a token)",
            )
        return claims_identity(self._verify(token), self.leeway)

    def _verify(self, token: str) -> dict[str, Any]:
        if self.jwks is None and self.public_key is None:
            # Secrets only: HS256 is the one algorithm, and decoding checks it (the
            # header is read again only to explain a refusal).
            alg: Any = HMAC_ALGORITHM
        else:
            try:
                alg = jwt.get_unverified_header(token).get("alg")
            except jwt.PyJWTError as exc:
                raise ApiError("unauthorized", f"the token is not a valid JWT: {exc}") from None
        if alg == HMAC_ALGORITHM:
            if not self.secrets:
                raise ApiError(
                    "unauthorized",
                    "HS256 tokens are not accepted: this gateway "
                    "verifies tokens with the identity provider's public keys",
                )
            candidates: list[tuple[Any, tuple[str, ...]]] = [
                (secret, (HMAC_ALGORITHM,)) for secret in self.secrets
            ]
        elif alg in ASYMMETRIC_ALGORITHMS:
            public = self._public_key(jwt.get_unverified_header(token).get("kid"), alg)
            candidates = [(public.key, public.algorithms)]
        else:
            raise ApiError("unauthorized", self._refused_algorithm(alg))
        for i, (key, algorithms) in enumerate(candidates):
            try:
                with warnings.catch_warnings():
                    # A short secret is reported once at start, not on every request.
                    warnings.simplefilter("ignore", InsecureKeyLengthWarning)
                    return jwt.decode(
                        token,
                        key,
                        algorithms=list(algorithms),
                        leeway=self.leeway,
                        issuer=self.issuer,
                        audience=self.audience,
                        options=self._options,
                    )
            except jwt.InvalidSignatureError:
                if i + 1 < len(candidates):
                    continue  # the next secret of a rotation
                raise ApiError("unauthorized", "the token's signature does not verify") from None
            except jwt.InvalidAlgorithmError:
                raise ApiError(
                    "unauthorized",
                    self._refused_algorithm(jwt.get_unverified_header(token).get("alg")),
                ) from None
            except jwt.InvalidTokenError as exc:
                raise ApiError("unauthorized", self._explain(exc)) from None
        raise AssertionError("unreachable: candidates is never empty")

    def _refused_algorithm(self, alg: Any) -> str:
        accepted = ([HMAC_ALGORITHM] if self.secrets else []) + (
            sorted(ASYMMETRIC_ALGORITHMS) if self.jwks or self.public_key else []
        )
        return f"the token's algorithm {alg!r} is not accepted (accepted: {', '.join(accepted)})"

    def _public_key(self, kid: Any, alg: str) -> PublicKey:
        key = self.jwks.get(kid) if self.jwks is not None else None
        if key is None:
            key = self.public_key
        if key is None:
            if self.jwks is None:
                raise ApiError(
                    "unauthorized",
                    f"{alg} tokens are not accepted: no public key "
                    "is configured (AUTH_JWKS_URL or AUTH_PUBLIC_KEY)",
                )
            if not isinstance(kid, str):
                raise ApiError("unauthorized", "the token has no kid header naming its key")
            raise ApiError(
                "unauthorized",
                f"the token's key id {kid[:64]!r} is not among the identity provider's keys",
            )
        if alg not in key.algorithms:
            raise ApiError(
                "unauthorized",
                f"the token's algorithm {alg} does not match its "
                f"key, which verifies {', '.join(key.algorithms)} only",
            )
        return key

    def _explain(self, exc: Exception) -> str:
        for cls, message in _ERRORS:
            if isinstance(exc, cls):
                return message
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return f"the token has no {exc.claim} claim"
        if isinstance(exc, jwt.InvalidIssuerError):
            return f"the token's issuer (iss) is not {self.issuer!r}"
        if isinstance(exc, jwt.InvalidAudienceError):
            return f"the token's audience (aud) does not include {self.audience!r}"
        return f"the token is not valid: {exc}"

    def check_metrics_key(self, key: str | None) -> None:
        """``GET /metrics``: ``METRICS_KEY`` or an API key when either is required,
        that is when ``METRICS_KEY`` is set or auth is on; open otherwise."""
        if self._metrics_key is None and self.open_mode:
            return
        if self._metrics_key is None and not self._api_keys:
            raise ApiError(
                "unauthorized",
                "no METRICS_KEY or API_KEYS is configured, and with auth on /metrics needs one",
            )
        if not key:
            raise ApiError(
                "unauthorized", "a metrics or API key is required: Authorization: Bearer <key>"
            )
        if self._metrics_key is not None and hmac.compare_digest(key.encode(), self._metrics_key):
            return
        if not is_api_key(self, key):
            raise ApiError("unauthorized", "the key is neither METRICS_KEY nor an API key")

    def check_api_key(self, key: str | None) -> None:
        if not self._api_keys:
            if self.open_mode:
                return
            raise ApiError(
                "unauthorized",
                "no API key is configured (API_KEYS), and with auth on this route needs one",
            )
        if not key:
            raise ApiError("unauthorized", "an API key is required: Authorization: Bearer <key>")
        given = key.encode()
        ok = False
        for candidate in self._api_keys:  # every key compared, in constant time
            ok |= hmac.compare_digest(given, candidate)
        if not ok:
            raise ApiError("unauthorized", "the API key is not valid")


def key_bucket(key: str) -> str:
    """The name an API key's caller is counted under (rate buckets, connection limits):
    a digest of the key, so no secret reaches Redis."""
    return "key:" + hashlib.sha256(key.encode()).hexdigest()[:24]


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


__all__ = ["Authenticator", "Identity", "JwksKeys", "bearer", "is_api_key", "key_bucket"]
