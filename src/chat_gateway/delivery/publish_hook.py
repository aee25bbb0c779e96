"""The publish hook: a backend's say on a user's post or edit before it is stored.

With ``PUBLISH_HOOK_URL`` set, every post and edit a user makes (HTTP
``POST …/messages`` and ``PATCH …/messages/{seq}``, WebSocket ``publish`` and
``edit``) in a namespace whose ``publish_hook`` option is on is first sent to the
backend as a Standard Webhooks request signed with ``WEBHOOK_SECRET``::

    {"type": "message.publish", "room": "lobby", "author": "ann", "text": "hi"}
    {"type": "message.edit", "room": "lobby", "author": "ann", "text": "hi!", "seq": 7}

and its answer decides: ``{"action": "accept"}`` stores the text as given,
``{"action": "modify", "text": "…"}`` stores that text instead, ``{"action":
"reject", "reason": "…"}`` refuses (403 ``rejected``, the reason shown to the
user), and nothing is stored before the answer. A hook that does not answer
within ``PUBLISH_HOOK_TIMEOUT`` seconds, cannot be reached, answers with a
status other than 2xx or with something that is not one of those answers
follows ``PUBLISH_HOOK_FAILURE``: ``closed`` refuses (503 ``unavailable``,
nothing stored), ``open`` stores the text as given. Such a failure is logged as
a warning at most once a minute (with the count of those left unlogged), never
once per request.

Each call is its own request on a pooled ``httpx.AsyncClient``: a hook that
stalls holds up only the posts waiting for it, never the event loop or the
posts of other rooms. Without ``WEBHOOK_ALLOW_PRIVATE`` the hook's host must
resolve to public addresses only (chat_gateway.webhooks.egress), as a webhook's.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from chat_gateway.config import Settings
from chat_gateway.errors import ApiError
from chat_gateway.metrics import Metrics
from chat_gateway.webhooks import egress
from chat_gateway.webhooks.signing import parse_secrets, signed_headers

log = logging.getLogger("gateway.publish_hook")

MAX_ANSWER_BYTES = 64 * 1024  # a longer answer is a bad one
MAX_REASON = 500  # characters of a reject's reason
LOG_EVERY = 60.0  # seconds between two warnings about the hook's failures
USER_AGENT = "chat-gateway-publish-hook"
DEFAULT_REASON = "the message was rejected"


class Kind(enum.StrEnum):
    """What the user is doing: the ``type`` of the hook's request."""

    PUBLISH = "message.publish"
    EDIT = "message.edit"


@dataclass(frozen=True, slots=True)
class Draft:
    """A user's post or edit as the hook is asked about it: ``author`` is who
    writes (an edit's editor), ``seq`` the edited message's."""

    kind: Kind
    room: str
    author: str
    text: str
    seq: int | None = None

    def body(self) -> bytes:
        payload: dict[str, Any] = {
            "type": self.kind.value,
            "room": self.room,
            "author": self.author,
            "text": self.text,
        }
        if self.seq is not None:
            payload["seq"] = self.seq
        return orjson.dumps(payload)


class Outcome(enum.StrEnum):
    """How one call ended: the ``outcome`` label of ``chat_publish_hook_total``."""

    ACCEPT = "accept"
    MODIFY = "modify"
    REJECT = "reject"
    TIMEOUT = "timeout"
    UNREACHABLE = "unreachable"  # refused connection, reset, DNS failure
    BLOCKED = "blocked"  # a non-public address without WEBHOOK_ALLOW_PRIVATE
    HTTP_ERROR = "http_error"  # a status other than 2xx
    BAD_ANSWER = "bad_answer"  # not JSON, too large, unknown action, invalid text


FAILURES = (
    Outcome.TIMEOUT,
    Outcome.UNREACHABLE,
    Outcome.BLOCKED,
    Outcome.HTTP_ERROR,
    Outcome.BAD_ANSWER,
)


class Failed(Exception):
    """The hook gave no usable answer; ``detail`` says why, for the log."""

    def __init__(self, outcome: Outcome, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


class ThrottledLog:
    """A warning logged at most once per ``every`` seconds; the next one says how
    many were left unlogged meanwhile."""

    def __init__(self, every: float = LOG_EVERY, clock: Callable[[], float] = time.monotonic):
        self.every = every
        self.clock = clock
        self.last: float | None = None
        self.unlogged = 0

    def warning(self, message: str, *args: Any) -> bool:
        now = self.clock()
        if self.last is not None and now - self.last < self.every:
            self.unlogged += 1
            return False
        skipped, self.unlogged, self.last = self.unlogged, 0, now
        suffix = f" ({skipped} more such failures since the last warning)" if skipped else ""
        log.warning(message + suffix, *args)
        return True


class PublishHook:
    """No hook (``PUBLISH_HOOK_URL`` unset): every text is stored as given."""

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def screen(self, draft: Draft, valid_text: Callable[[Any], str]) -> str:
        """The text to store for this post or edit; ``ApiError`` ``rejected`` when
        the backend refuses it, ``unavailable`` when it could not say and the
        policy is ``closed``. ``valid_text`` checks a modified text as a posted one
        (``ApiError`` when it is not)."""
        return draft.text


class HttpPublishHook(PublishHook):
    """The hook at ``PUBLISH_HOOK_URL``; ``applies(room)`` is the room's namespace's
    ``publish_hook`` option."""

    def __init__(self, settings: Settings, metrics: Metrics, applies: Callable[[str], bool]):
        if settings.publish_hook_url is None or settings.webhook_secret is None:
            raise ValueError("a publish hook needs PUBLISH_HOOK_URL and WEBHOOK_SECRET")
        self.url = egress.check_url(
            settings.publish_hook_url, allow_private=settings.webhook_allow_private
        )
        self.keys = parse_secrets(settings.webhook_secret)
        self.timeout = settings.publish_hook_timeout
        self.fail_open = settings.publish_hook_failure == "open"
        self.allow_private = settings.webhook_allow_private
        self.metrics = metrics
        self.applies = applies
        self.failures = ThrottledLog()
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(self.timeout),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=32),
            headers={"user-agent": USER_AGENT},
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def screen(self, draft: Draft, valid_text: Callable[[Any], str]) -> str:
        if not self.applies(draft.room):
            return draft.text
        started = time.monotonic()
        try:
            answer = await self._ask(draft.body())
            outcome, result = self._decide(answer, valid_text)
        except Failed as exc:
            self._observe(exc.outcome, started)
            where = f"{self.url.scheme}://{egress.origin(self.url)}/…"
            policy = "stored as given" if self.fail_open else "refused"
            self.failures.warning(
                "publish hook %s failed (%s): %s; posts are %s (PUBLISH_HOOK_FAILURE)",
                where,
                exc.outcome.value,
                exc.detail,
                policy,
            )
            if self.fail_open:
                return draft.text
            raise ApiError(
                "unavailable",
                "the publish hook did not answer usably; nothing was stored, retry later",
            ) from None
        self._observe(outcome, started)
        if outcome is Outcome.REJECT:
            raise ApiError("rejected", result, room=draft.room)
        return draft.text if outcome is Outcome.ACCEPT else result

    def _observe(self, outcome: Outcome, started: float) -> None:
        self.metrics.publish_hook_calls.labels(outcome.value).inc()
        self.metrics.publish_hook_latency.observe(time.monotonic() - started)

    async def _ask(self, body: bytes) -> bytes:
        """The hook's answer body to ``body``; ``Failed`` when there is none to use."""
        if self._client is None:
            raise RuntimeError("the publish hook is not started")
        headers = signed_headers(self.keys, "msg_" + uuid.uuid4().hex, body)
        try:
            async with asyncio.timeout(self.timeout):
                async with egress.post(
                    self._client, self.url, body, headers, allow_private=self.allow_private
                ) as response:
                    if not 200 <= response.status_code < 300:
                        raise Failed(Outcome.HTTP_ERROR, f"HTTP {response.status_code}")
                    answer = bytearray()
                    async for chunk in response.aiter_bytes():
                        answer += chunk
                        if len(answer) > MAX_ANSWER_BYTES:
                            raise Failed(
                                Outcome.BAD_ANSWER, f"the answer exceeds {MAX_ANSWER_BYTES} bytes"
                            )
                    return bytes(answer)
        except egress.Blocked as exc:
            raise Failed(Outcome.BLOCKED, str(exc)) from None
        except (TimeoutError, httpx.TimeoutException):
            raise Failed(Outcome.TIMEOUT, f"no answer within {self.timeout:g} s") from None
        except httpx.HTTPError as exc:
            raise Failed(Outcome.UNREACHABLE, f"{type(exc).__name__}: {exc}") from None

    @staticmethod
    def _decide(raw: bytes, valid_text: Callable[[Any], str]) -> tuple[Outcome, str]:
        """The answer read: (``ACCEPT``/``MODIFY``, text to store) or (``REJECT``,
        reason); ``Failed`` (bad answer) for anything else."""
        try:
            answer = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise Failed(Outcome.BAD_ANSWER, "the answer is not JSON") from None
        if not isinstance(answer, dict):
            raise Failed(Outcome.BAD_ANSWER, "the answer is not a JSON object")
        action = answer.get("action")
        if action == "accept":
            return Outcome.ACCEPT, ""
        if action == "reject":
            reason = answer.get("reason", DEFAULT_REASON)
            if not isinstance(reason, str) or not 1 <= len(reason.strip()) <= MAX_REASON:
                raise Failed(
                    Outcome.BAD_ANSWER, f"a reject's reason must be a string of 1..{MAX_REASON}"
                )
            return Outcome.REJECT, reason.strip()
        if action == "modify":
            try:
                return Outcome.MODIFY, valid_text(answer.get("text"))
            except ApiError as exc:
                raise Failed(Outcome.BAD_ANSWER, f"modify: {exc.message}") from None
        raise Failed(Outcome.BAD_ANSWER, f"unknown action {str(action)[:40]!r}")
