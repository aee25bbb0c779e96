"""Signed webhooks from the transactional outbox (docs/webhooks.md).

``storage`` writes each committed message's event to the outbox in the commit's
own transaction; this package delivers the outbox: it claims queue heads,
signs and posts them (Standard Webhooks), retries with backoff, keeps a
circuit breaker per receiver, and dead-letters what it must give up.
"""

from chat_gateway.webhooks.dispatcher import BreakerState, Webhooks

__all__ = ["BreakerState", "Webhooks"]
