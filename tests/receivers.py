"""Real HTTP receivers the gateway reports to: an OTLP/HTTP trace collector and a
stand-in for a Sentry DSN's host, and a webhook receiver. Each is a threaded HTTP
server on a free loopback port (bench.otlp_sink.serve) that decodes and keeps what
it is sent."""

from __future__ import annotations

import gzip
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from bench.otlp_sink import serve


def decoded(headers: Mapping[str, str], raw: bytes) -> bytes:
    encoding = headers.get("content-encoding", "").lower()
    if encoding == "gzip":
        return gzip.decompress(raw)
    if encoding == "deflate":
        return zlib.decompress(raw)
    if encoding == "br":
        import brotli  # type: ignore[import-not-found]

        return bytes(brotli.decompress(raw))
    return raw


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_id: str
    name: str
    service: str
    instance: str
    attributes: dict[str, Any]


@dataclass
class OtlpReceiver:
    """``POST /v1/traces`` with an ``ExportTraceServiceRequest`` (protobuf)."""

    url: str = ""
    spans: list[Span] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, data: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        request = ExportTraceServiceRequest()
        request.ParseFromString(data)
        for rs in request.resource_spans:
            res = {a.key: _value(a.value) for a in rs.resource.attributes}
            for ss in rs.scope_spans:
                for s in ss.spans:
                    span = Span(
                        trace_id=s.trace_id.hex(),
                        span_id=s.span_id.hex(),
                        parent_id=s.parent_span_id.hex(),
                        name=s.name,
                        service=str(res.get("service.name")),
                        instance=str(res.get("service.instance.id")),
                        attributes={a.key: _value(a.value) for a in s.attributes},
                    )
                    with self.lock:
                        self.spans.append(span)

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.trace_id == trace_id]

    def named(self, name: str) -> list[Span]:
        with self.lock:
            return [s for s in self.spans if s.name == name]


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


@dataclass
class SentryReceiver:
    """``POST /api/<project>/envelope/``: Sentry envelopes, kept whole (raw) and as
    their event items."""

    url: str = ""
    raw: list[bytes] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def dsn(self) -> str:
        return self.url.replace("http://", "http://publickey@") + "/42"

    def take(self, data: bytes) -> None:
        events = []
        pos = data.index(b"\n") + 1  # past the envelope's header
        while pos < len(data):
            eol = data.find(b"\n", pos)
            eol = len(data) if eol < 0 else eol
            if eol == pos:
                pos += 1
                continue
            header = orjson.loads(data[pos:eol])
            start = eol + 1
            length = header.get("length")
            if length is None:
                end = data.find(b"\n", start)
                end = len(data) if end < 0 else end
            else:
                end = start + length
            if header.get("type") == "event":
                events.append(orjson.loads(data[start:end]))
            pos = end + 1
        with self.lock:
            self.raw.append(data)
            self.events.extend(events)


@dataclass
class HookReceiver:
    """Any POST: the headers of each request, kept."""

    url: str = ""
    headers: list[dict[str, str]] = field(default_factory=list)

    def take(self, data: bytes, headers: Mapping[str, str]) -> None:
        self.headers.append(dict(headers))


@contextmanager
def serving(receiver: OtlpReceiver | SentryReceiver | HookReceiver) -> Iterator[Any]:
    def take(headers: Mapping[str, str], raw: bytes) -> None:
        if isinstance(receiver, HookReceiver):
            receiver.take(raw, headers)
        else:
            receiver.take(decoded(headers, raw))

    with serve(take) as url:
        receiver.url = url
        yield receiver


@dataclass
class SessionReceiver:
    """An application's session check (``AUTH_HOOK_URL``): answers each POST by the
    ``cookie`` of its JSON body from ``answers`` (status, body: a dict is sent as
    JSON, bytes as they are), 401 for a cookie it does not know; waits ``delay``
    seconds first. Keeps every request's headers, raw body and decoded body."""

    url: str = ""
    answers: dict[str, tuple[int, Any]] = field(default_factory=dict)
    delay: float = 0.0
    delays: dict[str, float] = field(default_factory=dict)  # per cookie, over ``delay``
    requests: list[tuple[dict[str, str], bytes, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def calls(self, cookie: str | None = None) -> int:
        with self.lock:
            return sum(1 for _, _, b in self.requests if cookie is None or b["cookie"] == cookie)

    def answer(self, headers: dict[str, str], raw: bytes) -> tuple[int, bytes]:
        body = orjson.loads(raw)
        with self.lock:
            self.requests.append((headers, raw, body))
        delay = self.delays.get(body["cookie"], self.delay)
        if delay:
            time.sleep(delay)
        status, answer = self.answers.get(body["cookie"], (401, {}))
        return status, answer if isinstance(answer, bytes) else orjson.dumps(answer)


@contextmanager
def serving_sessions(receiver: SessionReceiver) -> Iterator[SessionReceiver]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            status, body = receiver.answer({k.lower(): v for k, v in self.headers.items()}, raw)
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the gateway stopped reading (an answer too long for it)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/session"
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
