"""Traces over OTLP when the standard ``OTEL_*`` variables ask for them, else nothing.

The rest of the gateway speaks to :data:`active`: with tracing off it is
:class:`Off`, whose ``on`` is False and whose methods do nothing, and not one
OpenTelemetry module is imported. :func:`configure` (the CLI calls it once per
process) swaps in :class:`chat_gateway.tracing.otel.Otel` when
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set
(and ``OTEL_SDK_DISABLED`` is not ``true``). That module holds every line that
knows OpenTelemetry: the exporter, the sampler (``OTEL_TRACES_SAMPLER``), the
HTTP middleware, and the spans around store, Redis and WebSocket frame calls.

What the hot path pays with tracing off: the post's publish asks
:func:`traceparent` (one attribute check), a broker payload without a trace is
decoded as before, and the hub checks one field of it.

This module imports nothing of the project: every floor may use it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

__all__ = ["Off", "active", "configure", "enabled", "traceparent"]


@dataclass(frozen=True)
class Targets:
    """The classes whose calls get spans when tracing is on: the store interface
    (its public coroutines name the calls), the stores that implement it, the
    pipelined Redis connection and the WebSocket session. The server names them,
    so that tracing imports nothing of the gateway."""

    store_interface: type
    stores: tuple[type, ...]
    pipelined: type
    session: type


class Off:
    """Tracing off: nothing recorded, nothing carried."""

    on = False

    def instrument(self, targets: Targets) -> None:
        pass

    def traceparent(self) -> bytes | None:
        return None

    @contextlib.contextmanager
    def deliver(self, traceparent: bytes, room: str, seq: int) -> Iterator[None]:
        yield

    def exemplar(self) -> dict[str, str] | None:
        return None

    def middleware(self) -> list[Any]:
        return []

    def tag_request(self, request_id: str) -> None:
        pass

    def shutdown(self) -> None:
        pass


active: Any = Off()
"""The process's tracer: :class:`Off`, or ``Otel`` once :func:`configure` found the
variables (typed ``Any`` so that the optional extra stays optional for mypy too)."""


def enabled(environ: Mapping[str, str]) -> bool:
    """Whether the standard variables ask for traces."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def configure(
    environ: Mapping[str, str] | None = None,
    *,
    request_id: ContextVar[str | None] | None = None,
    release: str = "",
) -> Any:
    """Turn tracing on when ``environ`` (default: the process's) asks for it;
    return :data:`active`. ``request_id`` is the context variable holding the
    request or connection id, which every span started under it carries."""
    global active
    environ = os.environ if environ is None else environ
    if not active.on and enabled(environ):
        from chat_gateway.tracing.otel import Otel

        active = Otel(request_id=request_id, release=release)
    return active


def traceparent() -> bytes | None:
    """The W3C ``traceparent`` of the current span, for a broker payload; None when off."""
    return active.traceparent() if active.on else None
