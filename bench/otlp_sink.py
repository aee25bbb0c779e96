"""``--tracing``: the gateways export every span over OTLP/HTTP to a sink in this
process, which answers 200 and counts the requests and bytes (it does not decode
them: what the bench weighs is the gateway's cost of tracing, not a collector's).
:func:`serve` is the small HTTP receiver the tests' collectors use too."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Take = Callable[[Mapping[str, str], bytes], None]


@contextmanager
def serve(take: Take, status: int = 200) -> Iterator[str]:
    """A threaded HTTP server on a free loopback port that hands each POST's headers
    (lower-cased names) and raw body to ``take`` and answers ``status``; yields its URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            take({k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class Sink:
    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.url = ""

    def take(self, headers: Mapping[str, str], body: bytes) -> None:
        self.requests += 1
        self.bytes += len(body)

    def env(self) -> dict[str, str]:
        """The standard variables that turn a gateway's tracing on, every trace sampled."""
        return {
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.url,
            "OTEL_SERVICE_NAME": "chat-gateway-bench",
            "OTEL_TRACES_SAMPLER": "always_on",
        }


@contextmanager
def sink() -> Iterator[Sink]:
    counts = Sink()
    with serve(counts.take) as url:
        counts.url = url
        yield counts
