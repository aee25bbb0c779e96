"""Delivery of the webhook outbox: claims, attempts, backoff, breakers, dead letters.

Every instance runs one dispatcher. It claims due queue heads (one receiver and
one room each, see ``chat_gateway.storage.outbox``) up to ``WEBHOOK_CONCURRENCY`` attempts in
flight, posts each, and records the outcome in the outbox:

- 2xx: delivered; the next event of the same queue is leased in the same
  transaction and sent at once, so a room's backlog drains without a claim
  round per event.
- 410 Gone: the receiver is disabled for every instance (its events stay
  pending, nothing is lost) until an operator enables it again.
- anything else, a timeout, a refused connection or a blocked address: retried
  after a delay drawn with full jitter from ``[0, min(MAX, MIN * 2^(n-1))]``, or
  after ``Retry-After`` on a 429 or 503 (even past MAX); once the attempts reach
  ``WEBHOOK_MAX_ATTEMPTS`` or the event is older than ``WEBHOOK_MAX_AGE`` it is a
  dead letter, listed and replayable by the admin API.

A circuit breaker per receiver (per instance) opens after
``WEBHOOK_BREAKER_FAILURES`` consecutive failures: no claims for that receiver,
its backlog kept. After ``WEBHOOK_BREAKER_COOLDOWN`` seconds it half-opens and
one probe is sent; success closes it, failure opens it again. A dead receiver
so costs each instance at most the failures that open it plus one probe per
cool-down.

The dispatcher wakes when this instance commits a message (``poke``) and
otherwise every ``WEBHOOK_POLL_INTERVAL`` seconds, which is how events
committed by other instances, retries that came due and expired leases of a
killed instance are found.

A claim leases its row for ``LEASE`` seconds, and while the attempt is in
flight the dispatcher renews the lease every ``RENEW_EVERY`` seconds (one
statement for all its attempts): the lease is the instance's liveness signal.
An instance that dies (or loses the database) stops renewing, so its queues
are taken over within ``LEASE`` seconds plus a poll, however long
``WEBHOOK_TIMEOUT`` is.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from chat_gateway.storage import Store, StoreUnavailable
from chat_gateway.storage.base import format_ts, new_id
from chat_gateway.storage.outbox import Backlog, Delivery, Endpoint, Outbox
from chat_gateway.webhooks import egress
from chat_gateway.webhooks.metrics import WebhookMetrics
from chat_gateway.webhooks.signing import parse_secrets, signed_headers

log = logging.getLogger("gateway.webhooks")

MAX_RESPONSE_BYTES = 64 * 1024
# Best-effort events (presence): attempts each, and how many may wait at once.
EPHEMERAL_ATTEMPTS = 3
EPHEMERAL_MAX = 1000  # read of a receiver's answer, then the rest is dropped
USER_AGENT = "chat-gateway-webhooks/1"
# Seconds a claim leases its row, and between renewals of the leases in flight.
LEASE = 3.0
RENEW_EVERY = 1.0


class BreakerState(enum.Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"
    DISABLED = "disabled"  # not the breaker: the receiver answered 410 Gone


class Breaker:
    """Consecutive failures open it; a cool-down later one probe decides."""

    def __init__(self, threshold: int, cooldown: float) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self.probing = False

    def allows(self) -> bool:
        return self.state is BreakerState.CLOSED

    def wants_probe(self, now: float) -> bool:
        if self.state is BreakerState.OPEN and now >= self.opened_at + self.cooldown:
            self.state = BreakerState.HALF_OPEN
            self.probing = False
        return self.state is BreakerState.HALF_OPEN and not self.probing

    def success(self) -> None:
        self.state = BreakerState.CLOSED
        self.failures = 0
        self.probing = False

    def failure(self, now: float) -> None:
        self.failures += 1
        if self.state is BreakerState.HALF_OPEN or (
            self.state is BreakerState.CLOSED and self.failures >= self.threshold
        ):
            self.state = BreakerState.OPEN
            self.opened_at = now
            self.probing = False


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one attempt ended; ``kind`` is the metrics label."""

    kind: str  # success, http_error, gone, rate_limited, timeout, connect_error, blocked
    status: int | None = None
    error: str = ""
    retry_after: float | None = None

    @property
    def ok(self) -> bool:
        return self.kind == "success"


def delay(
    backoff: Any,
    attempts: int,
    retry_after: float | None = None,
    longest_wait: float = float("inf"),
) -> float:
    """Seconds before the next attempt after ``attempts`` failed ones: full jitter
    under ``min(MAX, MIN * 2^(attempts-1))``, or the receiver's ``Retry-After``
    (the receiver knows best; ``longest_wait``, the event's age limit, still ends it)."""
    if retry_after is not None:
        return min(retry_after, longest_wait)
    bound = min(backoff.longest, backoff.first * 2 ** min(attempts - 1, 62))
    return random.uniform(0, bound)


def retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Receiver:
    """One configured endpoint, its breaker and its last known backlog."""

    def __init__(self, endpoint: Endpoint, breaker: Breaker) -> None:
        self.endpoint = endpoint
        self.url = egress.check_url(endpoint.url, allow_private=True)
        self.breaker = breaker
        self.backlog = Backlog(endpoint.id, 0, None)
        # Bumped by each change this instance makes to ``endpoint`` (a 410, an
        # operator's enable): a refresh read before it does not undo it.
        self.version = 0

    def set_endpoint(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.version += 1

    @property
    def label(self) -> str:
        """``ID:host[:port]``, for metrics and logs: the receiver's id (its row in the
        outbox, shown by ``GET /v1/admin/webhooks``) and origin, never the path or
        query, which may hold the receiver's secret."""
        return f"{self.endpoint.id}:{egress.origin(self.url)}"

    @property
    def state(self) -> BreakerState:
        return BreakerState.DISABLED if self.endpoint.disabled else self.breaker.state


class Webhooks:
    """The dispatcher of one instance. Constructing it does no I/O; ``start`` does."""

    def __init__(self, store: Store, settings: Any, metrics: WebhookMetrics) -> None:
        self.store = store
        self.outbox: Outbox = store.outbox()
        self.settings = settings
        self.metrics = metrics
        self.keys = parse_secrets(settings.webhook_secret)
        self.urls = list(settings.webhook_urls)
        self.receivers: dict[int, Receiver] = {}
        self.lease = LEASE  # renewed while the attempt is in flight (_renew_loop)
        self.maintenance_interval = max(1.0, min(5.0, settings.webhook_poll_interval * 10))
        self._client: httpx.AsyncClient | None = None
        self._wake = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._held: dict[asyncio.Task[None], int] = {}  # attempt -> the outbox row it leases
        self._ephemeral: set[asyncio.Task[None]] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        # httpx logs every request at INFO: one line per attempt would drown the
        # gateway's own log; its warnings still come through.
        logging.getLogger("httpx").setLevel(max(logging.WARNING, log.getEffectiveLevel()))
        endpoints = await self.outbox.register(self.urls)
        s = self.settings
        for endpoint in endpoints:
            self.receivers[endpoint.id] = Receiver(
                endpoint, Breaker(s.webhook_breaker_failures, s.webhook_breaker_cooldown)
            )
        # From here every commit writes its events for these receivers.
        self.store.write_outbox([e.id for e in endpoints])
        self.metrics.watch(self)
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            timeout=httpx.Timeout(s.webhook_timeout),
            limits=httpx.Limits(
                max_connections=s.webhook_concurrency * 2,
                max_keepalive_connections=s.webhook_concurrency,
            ),
            headers={"user-agent": USER_AGENT},
        )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._claim_loop(), name="webhook claims"),
            loop.create_task(self._maintenance_loop(), name="webhook maintenance"),
            loop.create_task(self._renew_loop(), name="webhook leases"),
        ]

    async def close(self) -> None:
        """Stop claiming; attempts in flight get a short while to finish, the rest
        are cancelled (their leases run out and another instance sends them)."""
        self._closing = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        pending = self._inflight | self._ephemeral
        if pending:
            await asyncio.wait(pending, timeout=min(5.0, self.settings.webhook_timeout))
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def poke(self) -> None:
        """A message was committed here: claim now rather than at the next poll."""
        self._wake.set()

    async def record(self, type_: str, data: dict[str, Any], queue: str, pos: int) -> None:
        """Write an event that belongs to no message (``user.online``...) to the
        outbox for every receiver, at ``pos`` of ``queue`` (see ``Outbox.enqueue``),
        and claim it now: delivered, retried and dead-lettered as messages are."""
        ms = int(time.time() * 1000)
        await self.outbox.enqueue(
            list(self.receivers),
            "evt_" + new_id(ms),
            type_,
            queue,
            pos,
            orjson.dumps(data).decode(),
            ms,
        )
        self.poke()

    # -- claiming ----------------------------------------------------------------

    async def _claim_loop(self) -> None:
        poll = self.settings.webhook_poll_interval
        while True:
            try:
                await self._claim_round()
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                log.warning("webhook claim failed: %s", exc)
            except Exception:
                log.exception("webhook claim failed")
            try:
                await asyncio.wait_for(self._wake.wait(), poll)
            except TimeoutError:
                pass
            self._wake.clear()

    async def _claim_round(self) -> None:
        now = time.monotonic()
        free = self.settings.webhook_concurrency - len(self._inflight)
        probes = [
            r
            for r in self.receivers.values()
            if not r.endpoint.disabled and r.breaker.wants_probe(now)
        ]
        for receiver in probes:
            if free < 1:
                return
            claimed = await self.outbox.claim([receiver.endpoint.id], 1, self.lease)
            if claimed:
                receiver.breaker.probing = True
                self._spawn(claimed[0])
                free -= 1
        allowed = [
            r.endpoint.id
            for r in self.receivers.values()
            if not r.endpoint.disabled and r.breaker.allows()
        ]
        if free > 0 and allowed:
            for delivery in await self.outbox.claim(allowed, free, self.lease):
                self._spawn(delivery)

    def _spawn(self, delivery: Delivery) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(delivery))
        self._inflight.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()  # a slot is free

    # -- best-effort events ------------------------------------------------------------

    def notify(self, type_: str, data: dict[str, Any]) -> None:
        """Send an event that has no outbox row (presence), best effort: to each
        enabled receiver whose breaker is closed, from this instance's memory, at
        most ``EPHEMERAL_ATTEMPTS`` attempts; lost if the instance stops first, and
        not ordered with message events. Past ``EPHEMERAL_MAX`` waiting, dropped."""
        if self._closing:
            return
        ms = int(time.time() * 1000)
        event_id = "evt_" + new_id(ms)
        body = orjson.dumps(data).decode()
        loop = asyncio.get_running_loop()
        for receiver in self.receivers.values():
            if receiver.endpoint.disabled or not receiver.breaker.allows():
                continue
            if len(self._ephemeral) >= EPHEMERAL_MAX:
                self.metrics.dropped.labels(receiver.label).inc()
                continue
            event = Delivery(
                0, receiver.endpoint.id, event_id, type_, data.get("room", ""), 0, body, ms, 0
            )
            task = loop.create_task(self._ephemeral_attempts(receiver, event))
            self._ephemeral.add(task)
            task.add_done_callback(self._ephemeral.discard)

    async def _ephemeral_attempts(self, receiver: Receiver, event: Delivery) -> None:
        for attempt in range(1, EPHEMERAL_ATTEMPTS + 1):
            outcome = await self._send(receiver, event)
            self.metrics.attempts.labels(receiver.label, outcome.kind).inc()
            if outcome.ok:
                receiver.breaker.success()
                return
            if outcome.kind != "gone":  # a 410 is acted on by the next outbox attempt
                receiver.breaker.failure(time.monotonic())
            if outcome.kind == "gone" or not receiver.breaker.allows():
                break
            if attempt < EPHEMERAL_ATTEMPTS:
                await asyncio.sleep(min(30.0, self.delay(attempt, outcome.retry_after)))
        self.metrics.dropped.labels(receiver.label).inc()

    # -- one queue's attempts -------------------------------------------------------

    async def _deliver(self, delivery: Delivery | None) -> None:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("an attempt runs in a task")
        try:
            while delivery is not None:
                self._held[task] = delivery.id
                delivery = await self._attempt(delivery)
        except asyncio.CancelledError:
            raise
        except StoreUnavailable as exc:
            # The outcome is not recorded: the lease runs out and the event is sent again.
            log.warning("webhook outcome not recorded: %s", exc)
        except Exception:
            log.exception("webhook delivery failed")
        finally:
            self._held.pop(task, None)

    async def _renew_loop(self) -> None:
        """Every ``RENEW_EVERY`` seconds, extend the leases of the attempts in flight:
        while this instance lives, nobody else takes their queues."""
        while True:
            await asyncio.sleep(RENEW_EVERY)
            held = list(self._held.values())
            if not held:
                continue
            try:
                await self.outbox.renew(held, self.lease)
            except StoreUnavailable as exc:
                log.warning("webhook leases not renewed: %s", exc)
            except Exception:
                log.exception("webhook leases not renewed")

    async def _attempt(self, delivery: Delivery) -> Delivery | None:
        """Send one event and record the outcome; the queue's next event to send now,
        if any."""
        receiver = self.receivers[delivery.endpoint_id]
        if receiver.endpoint.disabled:
            await self.outbox.release(delivery)
            return None
        outcome = await self._send(receiver, delivery)
        self.metrics.attempts.labels(receiver.label, outcome.kind).inc()
        breaker = receiver.breaker
        if outcome.ok:
            breaker.success()
            self.metrics.latency.observe(max(0.0, time.time() - delivery.created_ms / 1000))
            chain = breaker.allows() and not self._closing
            return await self.outbox.delivered(
                delivery, outcome.status or 200, lease=self.lease, chain=chain
            )
        if outcome.kind == "gone":
            reason = "410 Gone at " + format_ts(int(time.time() * 1000))
            await self.outbox.disable(receiver.endpoint.id, reason)
            receiver.set_endpoint(Endpoint(receiver.endpoint.id, receiver.endpoint.url, reason))
            log.warning(
                "webhook receiver disabled: it answered 410 Gone",
                extra={"endpoint": receiver.label},
            )
            await self.outbox.retry(delivery, 0, outcome.status, outcome.error)
            return None
        breaker.failure(time.monotonic())
        attempts = delivery.attempts + 1
        age = time.time() - delivery.created_ms / 1000
        s = self.settings
        if attempts >= s.webhook_max_attempts or age >= s.webhook_max_age:
            await self.outbox.dead(delivery, outcome.status, outcome.error)
            self.metrics.dead.labels(receiver.label).inc()
            log.warning(
                "webhook event dead-lettered",
                extra={
                    "endpoint": receiver.label,
                    "event_id": delivery.event_id,
                    "attempts": attempts,
                    "error": outcome.error,
                },
            )
            return None
        await self.outbox.retry(
            delivery, self.delay(attempts, outcome.retry_after), outcome.status, outcome.error
        )
        return None

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        return delay(
            self.settings.webhook_backoff, attempts, retry_after, self.settings.webhook_max_age
        )

    def body(self, delivery: Delivery) -> bytes:
        return orjson.dumps(
            {
                "type": delivery.type,
                "timestamp": format_ts(delivery.created_ms),
                "data": orjson.loads(delivery.data),
            }
        )

    async def _send(self, receiver: Receiver, delivery: Delivery) -> Outcome:
        if self._client is None:
            raise RuntimeError("the webhook dispatcher is not started")
        body = self.body(delivery)
        headers = signed_headers(self.keys, delivery.event_id, body)
        try:
            async with asyncio.timeout(self.settings.webhook_timeout):
                async with egress.post(
                    self._client,
                    receiver.url,
                    body,
                    headers,
                    allow_private=self.settings.webhook_allow_private,
                ) as response:
                    read = 0
                    async for chunk in response.aiter_raw():
                        read += len(chunk)
                        if read > MAX_RESPONSE_BYTES:
                            break
        except egress.Blocked as exc:
            return Outcome("blocked", error=str(exc))
        except (TimeoutError, httpx.TimeoutException):
            return Outcome("timeout", error=f"no answer within {self.settings.webhook_timeout:g} s")
        except httpx.HTTPError as exc:
            return Outcome("connect_error", error=f"{type(exc).__name__}: {exc}")
        status = response.status_code
        if 200 <= status < 300:
            return Outcome("success", status)
        if status == 410:
            return Outcome("gone", status, "410 Gone")
        if status in (429, 503):
            return Outcome(
                "rate_limited" if status == 429 else "http_error",
                status,
                f"HTTP {status}",
                retry_after(response.headers.get("retry-after")),
            )
        return Outcome("http_error", status, f"HTTP {status}")

    # -- upkeep --------------------------------------------------------------------

    async def _maintenance_loop(self) -> None:
        while True:
            try:
                await self.refresh()
                keep = self.settings.webhook_keep_delivered
                await self.outbox.prune(int((time.time() - keep) * 1000), 1000)
            except asyncio.CancelledError:
                raise
            except StoreUnavailable as exc:
                log.warning("webhook upkeep failed: %s", exc)
            except Exception:
                log.exception("webhook upkeep failed")
            await asyncio.sleep(self.maintenance_interval)

    async def refresh(self) -> None:
        """Read disabled states (another instance may have seen a 410, an operator
        may have enabled one) and the backlog of every receiver. A receiver this
        instance changed while the read was under way keeps its own state."""
        versions = {id_: r.version for id_, r in self.receivers.items()}
        for endpoint in await self.outbox.endpoints():
            receiver = self.receivers.get(endpoint.id)
            if receiver is not None and receiver.version == versions[endpoint.id]:
                if receiver.endpoint.disabled and not endpoint.disabled:
                    receiver.breaker.success()
                receiver.endpoint = endpoint
        backlogs = {b.endpoint_id: b for b in await self.outbox.backlog()}
        for receiver in self.receivers.values():
            receiver.backlog = backlogs.get(
                receiver.endpoint.id, Backlog(receiver.endpoint.id, 0, None)
            )

    # -- operators -----------------------------------------------------------------

    def by_url(self, url: str) -> Receiver | None:
        for receiver in self.receivers.values():
            if receiver.endpoint.url == url:
                return receiver
        return None

    async def enable(self, receiver: Receiver) -> None:
        await self.outbox.enable(receiver.endpoint.id)
        receiver.set_endpoint(Endpoint(receiver.endpoint.id, receiver.endpoint.url))
        receiver.breaker.success()
        self._wake.set()

    def describe(self, receiver: Receiver) -> dict[str, Any]:
        oldest = receiver.backlog.oldest_ms
        return {
            "id": receiver.endpoint.id,
            "url": receiver.endpoint.url,
            "state": receiver.state.value,
            "backlog": receiver.backlog.pending,
            "oldest_pending_s": (
                None if oldest is None else round(max(0.0, time.time() - oldest / 1000), 3)
            ),
            "consecutive_failures": receiver.breaker.failures,
            "disabled_reason": receiver.endpoint.disabled_reason,
        }
