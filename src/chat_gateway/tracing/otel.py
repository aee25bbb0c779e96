"""Tracing on: OpenTelemetry's SDK, configured by the standard ``OTEL_*`` variables.

Imported only by :func:`chat_gateway.tracing.configure` when those variables ask
for traces (the ``otel`` extra installs what it needs). Spans:

- one per HTTP request (OpenTelemetry's ASGI middleware, outside every other
  one; a ``traceparent`` header is continued), tagged with the request id;
- one per WebSocket frame that does work (``ws <type>``; a run of publishes
  committed together is one ``ws publish``);
- one per store call and per pipelined Redis round trip made under one of those
  (``store.<method>``, ``redis.pipeline``): a background job's own calls start
  no trace;
- ``deliver`` on every instance that hands a post to its subscribers, a child of
  the span that published it: the publisher's ``traceparent`` rides in the
  broker payload (:mod:`chat_gateway.core.wire`);
- one per outgoing HTTP request (webhooks, the auth and publish hooks), each
  carrying a ``traceparent`` (OpenTelemetry's httpx instrumentation).

Export is OTLP/HTTP in batches (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_BSP_SCHEDULE_DELAY``, ...); sampling is ``OTEL_TRACES_SAMPLER`` (default:
every trace, or as the parent decided).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from starlette.middleware import Middleware

from chat_gateway.tracing import Targets

SERVICE = "chat-gateway"
# Polled every second by probes and scrapers: a trace each would bury the rest.
EXCLUDED_URLS = "/healthz,/readyz,/metrics,/v1/stats/events"
REQUEST_ID = "chat.request_id"


class _RequestIds(SpanProcessor):
    """Every span started while a request or connection is handled carries its id."""

    def __init__(self, var: ContextVar[str | None]) -> None:
        self.var = var

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        rid = self.var.get()
        if rid:
            span.set_attribute(REQUEST_ID, rid)


class Otel:
    on = True

    def __init__(self, *, request_id: ContextVar[str | None] | None, release: str) -> None:
        attributes: dict[str, Any] = {"service.instance.id": f"{os.uname().nodename}:{os.getpid()}"}
        if not os.environ.get("OTEL_SERVICE_NAME"):
            attributes["service.name"] = SERVICE
        if release:
            attributes["service.version"] = release
        self.provider = provider = TracerProvider(resource=Resource.create(attributes))
        if request_id is not None:
            provider.add_span_processor(_RequestIds(request_id))
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        self.tracer = provider.get_tracer("chat_gateway")
        self.propagator = TraceContextTextMapPropagator()
        HTTPXClientInstrumentor().instrument(tracer_provider=provider)

    def instrument(self, targets: Targets) -> None:
        """Spans around the calls of the classes ``targets`` names (given by the
        server, so that this module imports nothing of the gateway)."""
        _instrument(self.tracer, targets)

    def traceparent(self) -> bytes | None:
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier)
        value = carrier.get("traceparent")
        return value.encode() if value else None

    @contextlib.contextmanager
    def deliver(self, traceparent: bytes, room: str, seq: int) -> Iterator[None]:
        parent = self.propagator.extract({"traceparent": traceparent.decode("ascii", "replace")})
        with self.tracer.start_as_current_span(
            "deliver",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={"messaging.destination.name": room, "chat.seq": seq},
        ):
            yield

    def exemplar(self) -> dict[str, str] | None:
        ctx = trace.get_current_span().get_span_context()
        if not ctx.is_valid or not ctx.trace_flags.sampled:
            return None
        return {"trace_id": trace.format_trace_id(ctx.trace_id)}

    def middleware(self) -> list[Any]:
        return [
            Middleware(
                OpenTelemetryMiddleware,
                excluded_urls=EXCLUDED_URLS,
                exclude_spans=["receive", "send"],
                tracer_provider=self.provider,
            )
        ]

    def tag_request(self, request_id: str) -> None:
        trace.get_current_span().set_attribute(REQUEST_ID, request_id)

    def shutdown(self) -> None:
        self.provider.shutdown()


# -- spans around the gateway's own calls ----------------------------------------


def _in_trace() -> bool:
    return trace.get_current_span().get_span_context().is_valid


def _wrap(cls: type, name: str, span: Callable[[tuple[Any, ...]], str], tracer: Any) -> None:
    """Replace ``cls.name`` (a coroutine function) by one that runs in a span, named
    by ``span(args)``, when a trace is under way."""
    fn = cls.__dict__[name]
    if getattr(fn, "__traced__", False):
        return

    @functools.wraps(fn)
    async def traced(*args: Any, **kwargs: Any) -> Any:
        if not _in_trace():
            return await fn(*args, **kwargs)
        with tracer.start_as_current_span(span(args), kind=SpanKind.CLIENT):
            return await fn(*args, **kwargs)

    traced.__traced__ = True  # type: ignore[attr-defined]
    setattr(cls, name, traced)


def _instrument(tracer: Any, targets: Targets) -> None:
    Store, Session = targets.store_interface, targets.session
    calls = [name for name, value in vars(Store).items() if _coroutine(value) and name[0] != "_"]
    for cls in targets.stores:
        for name in calls:
            if name in cls.__dict__:
                _wrap(cls, name, functools.partial(_named, f"store.{name}"), tracer)
    _wrap(targets.pipelined, "run", lambda _: "redis.pipeline", tracer)
    # Frames: a root span per frame, so the frame opens its own trace.
    _frame(Session, "handle", lambda args: f"ws {args[1].get('type')}", tracer)
    _frame(Session, "commit", lambda args: "ws publish" if args[1] else None, tracer)


def _frame(
    cls: type, name: str, span: Callable[[tuple[Any, ...]], str | None], tracer: Any
) -> None:
    fn = cls.__dict__[name]
    if getattr(fn, "__traced__", False):
        return

    @functools.wraps(fn)
    async def traced(*args: Any, **kwargs: Any) -> Any:
        name = span(args)
        if name is None or _in_trace():  # nothing to do, or inside a frame's span already
            return await fn(*args, **kwargs)
        with tracer.start_as_current_span(name, kind=SpanKind.SERVER):
            return await fn(*args, **kwargs)

    traced.__traced__ = True  # type: ignore[attr-defined]
    setattr(cls, name, traced)


def _named(name: str, args: tuple[Any, ...]) -> str:
    return name


def _coroutine(value: Any) -> bool:
    import inspect

    return inspect.iscoroutinefunction(value)
