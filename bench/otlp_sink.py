"""``--tracing``: the gateways export every span over OTLP/HTTP to a sink in this
process, which answers 200 and counts the requests and bytes (it does not decode
them: what the bench weighs is the gateway's cost of tracing, not a collector's)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Sink:
    def __init__(self) -> None:
        self.requests = 0
        self.bytes = 0
        self.url = ""

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

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            counts.requests += 1
            counts.bytes += length
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    counts.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield counts
    finally:
        server.shutdown()
        server.server_close()
