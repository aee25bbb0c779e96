"""The application's own sessions (``AUTH_HOOK_URL``): a request with no bearer token
but a cookie is identified by asking the application's backend.

The gateway POSTs ``{"cookie", "address", "path"}`` (the request's ``Cookie`` header,
the client address, the path asked for; nothing else of the request), signed as
webhooks are (Standard Webhooks headers, with ``AUTH_HOOK_SECRET`` or else
``WEBHOOK_SECRET``). The answer:

- 200 ``{"sub", "exp", "rooms"?, "read_rooms"?, "moderate"?}``: a session, checked
  as a token's claims are (:func:`chat_gateway.access.auth.claims_identity`) and
  with ``exp`` in the future; an answer that is not that is refused (401) and
  logged;
- 401 / 403: refused with that status;
- anything else, no answer within ``AUTH_HOOK_TIMEOUT``, no connection: 503
  ``unavailable``, never let in.

Answers (sessions, refusals and bad answers alike; not failures) are kept
``AUTH_HOOK_CACHE`` seconds, a session never past its ``exp``, under the SHA-256
of the cookie (the cookie itself is never kept), at most ``AUTH_HOOK_CACHE_SIZE``
of them, the least recently used dropped first. Callers asking about the same
cookie while a call is under way wait for that call (single flight); the call
runs on the event loop with httpx and never blocks it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import httpx
import orjson

from chat_gateway.access.auth import Identity, claims_identity
from chat_gateway.errors import ApiError

log = logging.getLogger("gateway.auth")

# An answer longer than this is a failed call: a session's claims are a few hundred bytes.
MAX_ANSWER_BYTES = 64 * 1024

# (webhook id, timestamp, body) -> the webhook-signature header value
Signer = Callable[[str, int, bytes], str]
Outcome = Identity | ApiError


class SessionHook:
    """Asks ``url`` who a cookie belongs to. Constructing it does no I/O; ``close``
    closes its HTTP client."""

    def __init__(
        self,
        url: str,
        *,
        sign: Signer,
        cache_seconds: float = 60.0,
        timeout: float = 2.0,
        max_entries: int = 10000,
        leeway: float = 5.0,
    ) -> None:
        self.url = url
        self.sign = sign
        self.cache_seconds = cache_seconds
        self.timeout = timeout
        self.max_entries = max_entries
        self.leeway = leeway
        # digest of the cookie -> (wall-clock time it is kept until, the outcome)
        self._cache: OrderedDict[bytes, tuple[float, Outcome]] = OrderedDict()
        self._calls: dict[bytes, asyncio.Task[Outcome]] = {}
        self._http: httpx.AsyncClient | None = None
        self._failing = False

    async def close(self) -> None:
        for task in list(self._calls.values()):
            task.cancel()
        await asyncio.gather(*self._calls.values(), return_exceptions=True)
        if self._http is not None:
            await self._http.aclose()

    async def identify(self, cookie: str, address: str, path: str) -> Identity:
        """The session ``cookie`` belongs to, or ``ApiError`` (401, 403 or 503)."""
        key = hashlib.sha256(cookie.encode()).digest()
        kept = self._cache.get(key)
        if kept is not None:
            if kept[0] > time.time():
                self._cache.move_to_end(key)
                return _outcome(kept[1])
            del self._cache[key]
        task = self._calls.get(key)
        if task is None:
            task = asyncio.create_task(self._ask(key, cookie, address, path), name="session hook")
            self._calls[key] = task
            task.add_done_callback(lambda _: self._calls.pop(key, None))
        return _outcome(await asyncio.shield(task))

    async def _ask(self, key: bytes, cookie: str, address: str, path: str) -> Outcome:
        try:
            status, body = await asyncio.wait_for(
                self._post(orjson.dumps({"cookie": cookie, "address": address, "path": path})),
                self.timeout + 1,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return self._failed(f"{type(exc).__name__}: {exc}".rstrip(": "))
        if status not in (200, 401, 403):
            return self._failed(f"status {status}")
        if self._failing:
            log.warning("the session hook %s answers again", self.url)
            self._failing = False
        outcome = self._read(status, body)
        until = time.time() + self.cache_seconds
        if isinstance(outcome, Identity) and outcome.exp is not None:
            until = min(until, float(outcome.exp))
        if self.cache_seconds > 0:
            self._cache[key] = (until, outcome)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return outcome

    def _read(self, status: int, body: bytes) -> Outcome:
        if status == 401:
            return ApiError("unauthorized", "the application does not know this session")
        if status == 403:
            return ApiError("forbidden", "the application refuses this session")
        try:
            claims = orjson.loads(body)
            if not isinstance(claims, dict):
                raise ApiError("unauthorized", "the session hook's answer is not a JSON object")
            identity = claims_identity(claims, self.leeway, "session")
            if identity.expires_at is not None and identity.expires_at <= time.time():
                raise ApiError("unauthorized", "the session has expired")
        except orjson.JSONDecodeError:
            refusal = ApiError("unauthorized", "the session hook's answer is not JSON")
        except ApiError as exc:
            refusal = exc
        else:
            return identity
        log.warning("the session hook %s gave an answer refused: %s", self.url, refusal.message)
        return ApiError("unauthorized", refusal.message)

    def _failed(self, why: str) -> ApiError:
        if not self._failing:
            log.warning("the session hook %s failed (%s): sessions are refused", self.url, why)
            self._failing = True
        return ApiError(
            "unavailable", "the application's session check is unavailable; retry later"
        )

    async def _post(self, body: bytes) -> tuple[int, bytes]:
        if self._http is None:
            self._http = httpx.AsyncClient(
                timeout=self.timeout, headers={"User-Agent": "chat-gateway"}
            )
        event_id = "msg_" + uuid.uuid4().hex
        timestamp = int(time.time())
        headers: dict[str, Any] = {
            "content-type": "application/json",
            "webhook-id": event_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": self.sign(event_id, timestamp, body),
        }
        async with self._http.stream("POST", self.url, content=body, headers=headers) as response:
            answer = bytearray()
            async for chunk in response.aiter_bytes():
                answer += chunk
                if len(answer) > MAX_ANSWER_BYTES:
                    raise ValueError(f"the answer is longer than {MAX_ANSWER_BYTES} bytes")
            return response.status_code, bytes(answer)


def _outcome(outcome: Outcome) -> Identity:
    if isinstance(outcome, ApiError):
        raise ApiError(outcome.code, outcome.message)
    return outcome


__all__ = ["SessionHook", "Signer"]
