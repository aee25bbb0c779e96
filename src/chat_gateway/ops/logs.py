"""Structured logs: one JSON object per line, with the fields a log shipper indexes.

Every line logged while a request or connection is handled carries its id
(``conn``): the caller's ``X-Request-ID`` when it is a plain token, else a new
one, echoed in the response's ``X-Request-ID``. At info level the gateway logs
one line per HTTP response (method, path without the query string, status,
duration) and per WebSocket/SSE open and close; never a message's text, a token
or a query string.
"""

from __future__ import annotations

import contextvars
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_plus

import orjson

conn_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("conn_id", default=None)
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# uvicorn logs WebSocket paths with their query string; tokens ride there. A
# parameter's name is compared as the server reads it: percent-decoded, so
# ?%74oken= is redacted like ?token=.
_PARAM = re.compile(r"([?&])([^=&\s\"']*)=([^&\s\"']*)")
_SECRETS = {"token", "access_token", "api_key", "key"}
# Control characters in a line of the text format would let a request path
# (decoded from %0A and the like) start a forged line.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def redact(text: str) -> str:
    """``text`` with the values of secret query parameters replaced."""
    if "=" not in text:
        return text

    def one(m: re.Match[str]) -> str:
        if unquote_plus(m.group(2)).strip().lower() in _SECRETS:
            return f"{m.group(1)}{m.group(2)}=[redacted]"
        return m.group(0)

    return _PARAM.sub(one, text)


access = logging.getLogger("gateway.access")

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "color_message",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        cid = conn_id.get()
        if cid is not None:
            out["conn"] = cid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """One plain line per record: secrets redacted, control characters escaped
    (a newline from a request path cannot start a line of its own)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", redact(record.message))
        return super().formatMessage(record)


class WebSocketLines(logging.Filter):
    """uvicorn's own WebSocket lines: its accept line is dropped (the gateway's
    "websocket opened" line says it, once), and the others (a refused upgrade)
    name the path without its query string (``?user=``, ``?token=``)."""

    ACCEPTED = '%s - "WebSocket %s" [accepted]'
    PREFIX = '%s - "WebSocket %s"'

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == self.ACCEPTED:
            return False
        if (
            isinstance(record.msg, str)
            and record.msg.startswith(self.PREFIX)
            and isinstance(record.args, tuple)
            and len(record.args) >= 2
        ):
            record.args = (record.args[0], str(record.args[1]).split("?", 1)[0], *record.args[2:])
        return True


def setup(level: str = "info", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    uvicorn_error = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, WebSocketLines) for f in uvicorn_error.filters):
        uvicorn_error.addFilter(WebSocketLines())
    # Access lines carry query strings (tokens on /v1/ws and SSE): keep them out at info.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def request_id(scope: Any) -> str:
    """The caller's ``X-Request-ID`` when it is a plain token, else a new id."""
    raw = b""
    for name, value in scope.get("headers") or ():  # no dict of every header per request
        if name == b"x-request-id":
            raw = value  # the last one, as a dict of the headers would keep
    given: str = raw.decode("latin-1")
    return given if _REQUEST_ID.fullmatch(given) else os.urandom(8).hex()


on_request: list[Callable[[str], None]] = []
"""Told each HTTP request's id as it starts (chat_gateway.server.cli plugs in tracing's
span tag and the error reports' scope tag when they are on)."""


def timed(scope: Any, status: int, seconds: float) -> None:
    """Count an answered request in its gateway's request-duration histogram."""
    gateway = getattr(getattr(scope.get("app"), "state", None), "gateway", None)
    if gateway is not None and status:
        gateway.metrics.requested(scope["method"], status, seconds)


class RequestContext:
    """ASGI middleware: a request/connection id for every log line, and an access line."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        cid = request_id(scope)
        token = conn_id.set(cid)
        for hook in on_request:  # none unless tracing or error reports are on
            hook(cid)
        status = 0
        t0 = time.perf_counter()

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {
                    **message,
                    "headers": [*message.get("headers", ()), (b"x-request-id", cid.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id if scope["type"] == "http" else send)
        finally:
            if scope["type"] == "http":
                timed(scope, status, time.perf_counter() - t0)
            if scope["type"] == "http" and access.isEnabledFor(logging.INFO):
                access.info(
                    "%s %s %d",
                    scope["method"],
                    scope["path"],
                    status,
                    extra={
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "duration_ms": round((time.perf_counter() - t0) * 1000, 2),
                    },
                )
            conn_id.reset(token)
