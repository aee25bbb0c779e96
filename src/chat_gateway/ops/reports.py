"""Error reports to Sentry when ``SENTRY_DSN`` is set (the ``sentry`` extra).

Only unexpected failures are reported: an exception no handler answered (the
500 ``internal`` answer, a WebSocket session's crash, a background job's error
log). A client's mistake is an ``ApiError`` answered with its code and is never
sent, nor is an unreachable store answered 503.

Each report carries the request or connection id (tag ``request_id``, the
``X-Request-ID`` the caller saw), the release and the instance, and nothing a
user wrote or holds: :func:`scrub` (the ``before_send`` hook) keeps of the
request its method and path only (no query string, headers, cookies or body),
replaces every exception's message by its type (a message may quote the text it
failed on), drops breadcrumbs, local variables and user data, and redacts
secret query parameters from the log line.

Without ``SENTRY_DSN`` the SDK is not imported.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit

from chat_gateway.errors import ApiError
from chat_gateway.ops.logs import redact
from chat_gateway.storage import StoreUnavailable

# Answered on purpose: the client's mistake, or a dependency known to be down.
EXPECTED = (ApiError, StoreUnavailable)
SCRUBBED = "[scrubbed]"


def configure(
    dsn: str | None,
    *,
    release: str,
    instance: str,
    request_id: ContextVar[str | None],
) -> bool:
    """Start the SDK when ``dsn`` is set; True when it did."""
    if not dsn:
        return False
    import sentry_sdk

    def before_send(event: dict[str, Any], hint: dict[str, Any]) -> dict[str, Any] | None:
        return scrub(event, hint, request_id.get())

    sentry_sdk.init(
        dsn=dsn,
        release=release,
        server_name=instance,
        environment=os.environ.get("SENTRY_ENVIRONMENT") or None,
        send_default_pii=False,
        include_local_variables=False,
        max_breadcrumbs=0,
        traces_sample_rate=None,  # traces are OpenTelemetry's (chat_gateway.tracing)
        before_send=before_send,  # type: ignore[arg-type]
    )
    return True


def tag_request(request_id: str) -> None:
    """Tag the request's scope: its reports carry the id even when raised past the
    middleware that holds it (an error answered 500 by the outermost one)."""
    import sentry_sdk

    sentry_sdk.set_tag("request_id", request_id)


def scrub(
    event: dict[str, Any], hint: dict[str, Any], request_id: str | None
) -> dict[str, Any] | None:
    """The event as it may leave, or None for one that must not be sent."""
    exc_info = hint.get("exc_info")
    if exc_info and isinstance(exc_info[1], EXPECTED):
        return None
    tags = event.setdefault("tags", {})
    if request_id:
        tags["request_id"] = request_id
    request = event.get("request")
    if isinstance(request, dict):
        url = request.get("url")
        event["request"] = {
            "method": request.get("method"),
            **({"url": urlsplit(str(url))._replace(query="", fragment="").geturl()} if url else {}),
        }
    for exc in (event.get("exception") or {}).get("values") or ():
        if exc.get("value"):
            exc["value"] = SCRUBBED
        for frame in (exc.get("stacktrace") or {}).get("frames") or ():
            frame.pop("vars", None)
    logentry = event.get("logentry")
    if isinstance(logentry, dict):
        if logentry.get("message"):
            logentry["message"] = redact(str(logentry["message"]))
        logentry.pop("params", None)
        logentry.pop("formatted", None)
    event.pop("breadcrumbs", None)
    event.pop("user", None)
    event.pop("extra", None)
    return event
