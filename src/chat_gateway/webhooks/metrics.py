"""Webhook series on the gateway's registry: attempts, dead letters, latency, and,
read when scraped, backlog, oldest pending age and breaker state per receiver."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

from chat_gateway.storage.outbox import Backlog


class Watched(Protocol):
    """A receiver as these series read it (``chat_gateway.webhooks.dispatcher.Receiver``)."""

    @property
    def label(self) -> str: ...
    @property
    def backlog(self) -> Backlog: ...
    @property
    def state(self) -> Any: ...  # an enum whose value is a key of STATE_VALUES


class Dispatcher(Protocol):
    """What the series read of the dispatcher (``chat_gateway.webhooks.dispatcher.Webhooks``)."""

    @property
    def receivers(self) -> Mapping[Any, Watched]: ...


OUTCOMES = ("success", "http_error", "gone", "rate_limited", "timeout", "connect_error", "blocked")
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
)
# breaker state as a number, for alerts: 0 closed, 1 half open, 2 open, 3 disabled
STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2, "disabled": 3}


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.attempts = Counter(
            "chat_webhook_attempts_total",
            "Webhook attempts by outcome",
            ["endpoint", "outcome"],
            registry=registry,
        )
        self.dead = Counter(
            "chat_webhook_dead_letters_total",
            "Events given up (dead letters)",
            ["endpoint"],
            registry=registry,
        )
        self.dropped = Counter(
            "chat_webhook_ephemeral_dropped_total",
            "Best-effort events (presence) given up",
            ["endpoint"],
            registry=registry,
        )
        self.latency = Histogram(
            "chat_webhook_delivery_latency_seconds",
            "Commit to successful webhook delivery",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._hooks: Dispatcher | None = None
        registry.register(_Collector(self))

    def watch(self, hooks: Dispatcher) -> None:
        self._hooks = hooks
        for receiver in hooks.receivers.values():
            for outcome in OUTCOMES:
                self.attempts.labels(receiver.label, outcome)
            self.dead.labels(receiver.label)
            self.dropped.labels(receiver.label)


class _Collector:
    def __init__(self, metrics: WebhookMetrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        hooks = self.metrics._hooks
        if hooks is None:
            return
        backlog = GaugeMetricFamily(
            "chat_webhook_backlog", "Pending webhook events", labels=["endpoint"]
        )
        oldest = GaugeMetricFamily(
            "chat_webhook_oldest_pending_seconds",
            "Age of the oldest pending webhook event",
            labels=["endpoint"],
        )
        state = GaugeMetricFamily(
            "chat_webhook_breaker_state",
            "0 closed, 1 half open, 2 open, 3 disabled (410 Gone)",
            labels=["endpoint"],
        )
        now = time.time()
        for receiver in hooks.receivers.values():
            b = receiver.backlog
            backlog.add_metric([receiver.label], b.pending)
            oldest.add_metric(
                [receiver.label], 0.0 if b.oldest_ms is None else max(0.0, now - b.oldest_ms / 1000)
            )
            state.add_metric([receiver.label], STATE_VALUES[receiver.state.value])
        yield backlog
        yield oldest
        yield state
