"""Prometheus metrics, one registry per gateway (no global state across apps)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from chat_gateway import tracing

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.connections = Gauge(
            "chat_connections", "Open client connections", ["transport"], registry=r
        )
        self.subscriptions = Gauge(
            "chat_subscriptions", "Room subscriptions held on this instance", registry=r
        )
        self.messages_accepted = Counter(
            "chat_messages_accepted_total",
            "Messages committed by this instance",
            ["transport"],
            registry=r,
        )
        self.messages_delivered = Counter(
            "chat_messages_delivered_total", "Message frames queued to subscribers", registry=r
        )
        self.messages_dropped = Counter(
            "chat_messages_dropped_total", "Frames not delivered, by reason", ["reason"], registry=r
        )
        self.events_published = Counter(
            "chat_events_published_total", "Ephemeral events accepted", registry=r
        )
        self.delivery_latency = Histogram(
            "chat_delivery_latency_seconds",
            "Commit to queued-for-subscriber latency",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_duration = Histogram(
            "chat_http_request_duration_seconds",
            "HTTP request handling time, by method and status class",
            ["method", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_requests = Counter(
            "chat_history_cache_total", "History cache lookups", ["outcome"], registry=r
        )
        self.rate_limit = Counter(
            "chat_rate_limit_decisions_total",
            "Rate-limit decisions",
            ["action", "decision"],
            registry=r,
        )
        self.ready = Gauge(
            "chat_ready",
            "1 when the last readiness check passed, else 0 (each /readyz probes; a "
            "scrape reuses a probe round started at most 1 s before it)",
            registry=r,
        )
        self.rate_limit_fallback = Gauge(
            "chat_rate_limit_local_fallback",
            "1 while the limiter runs on per-instance buckets because Redis is unreachable",
            registry=r,
        )
        self.slow_disconnects = Counter(
            "chat_slow_consumer_disconnects_total",
            "Subscribers closed because their queue was full",
            ["transport"],
            registry=r,
        )
        self.broker_reconnects = Counter(
            "chat_broker_reconnects_total", "Broker subscriber link re-established", registry=r
        )
        self.state_snapshots = Counter(
            "chat_state_snapshots_total",
            "State room subscriptions (a snapshot, or the writes after since) and GETs of a "
            "room's state answered, by source: the store (a read of its own: the room opened "
            "on this instance, or a GET with no current values here) or memory (the room's "
            "values held here, a read another answer made, or the last GET's read still "
            "current)",
            ["source"],
            registry=r,
        )
        self.state_writes = Counter(
            "chat_state_writes_total", "State room keys written (set or deleted)", registry=r
        )
        self.gap_fills = Counter(
            "chat_gap_fills_total", "Fills of a room from the store", ["reason"], registry=r
        )
        self.change_log_reads = Counter(
            "chat_change_log_reads_total",
            "Pages of a room's change log read from the store, by path: a room's gap "
            "fill (fill), its change fill (change_fill), a subscriber's catch-up (catch_up)",
            ["path"],
            registry=r,
        )
        self.publish_hook_calls = Counter(
            "chat_publish_hook_total",
            "Calls of the publish hook (PUBLISH_HOOK_URL), by outcome",
            ["outcome"],
            registry=r,
        )
        self.publish_hook_latency = Histogram(
            "chat_publish_hook_duration_seconds",
            "Time from a publish hook call to its answer (or failure)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Series that exist from the start, so dashboards and alerts see zeros.
        for transport in ("ws", "sse"):
            self.connections.labels(transport)
            self.slow_disconnects.labels(transport)
        for transport in ("http", "ws"):
            self.messages_accepted.labels(transport)
        for outcome in ("hit", "miss", "error"):
            self.cache_requests.labels(outcome)
        self.messages_dropped.labels("slow_consumer")
        for path in ("fill", "change_fill", "catch_up"):
            self.change_log_reads.labels(path)
        self._pool_source: Callable[[], dict[str, Any]] = dict  # no pool: no pool gauges
        r.register(_PoolCollector(self))
        # Labelled children looked up once: a label lookup per request or post is a
        # lock, a tuple and a dict probe each time. No series is ever removed.
        self._requests: dict[tuple[str, int], Any] = {}
        self._accepted: dict[str, Any] = {}

    def accepted(self, transport: str, count: int = 1) -> None:
        """``count`` posts committed, arrived over ``transport``."""
        child = self._accepted.get(transport)
        if child is None:
            child = self._accepted[transport] = self.messages_accepted.labels(transport)
        child.inc(count)

    def delivered(self, count: int, created_ms: int) -> None:
        self.messages_delivered.inc(count)
        self.delivery_latency.observe(
            max(0.0, time.time() - created_ms / 1000),
            tracing.active.exemplar() if tracing.active.on else None,
        )

    def requested(self, method: str, status: int, seconds: float) -> None:
        """One HTTP request answered; with tracing on its trace id is the exemplar."""
        child = self._requests.get((method, status // 100))
        if child is None:
            child = self._requests[(method, status // 100)] = self.request_duration.labels(
                method, f"{status // 100}xx"
            )
        child.observe(seconds, tracing.active.exemplar() if tracing.active.on else None)

    def cache(self, outcome: str) -> None:
        self.cache_requests.labels(outcome).inc()

    def watch_pool(self, source: Callable[[], dict[str, Any]]) -> None:
        self._pool_source = source

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The body and content type the scraper's ``Accept`` asks for: OpenMetrics
        (which carries exemplars: the trace ids of the histograms' observations when
        tracing is on) or the text format."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class _PoolCollector:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        stats = self.metrics._pool_source()
        for key in ("pool_size", "pool_in_use", "pool_max"):
            if key in stats:
                g = GaugeMetricFamily(f"chat_db_{key}", f"Database {key.replace('_', ' ')}")
                g.add_metric([], stats[key])
                yield g
