"""Verifying the gateway's webhook requests, with the Standard Webhooks library."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from standardwebhooks.webhooks import Webhook, WebhookVerificationError

__all__ = ["WebhookVerificationError", "verify_webhook"]


def verify_webhook(
    secret: str | Sequence[str], body: bytes | str, headers: Mapping[str, str]
) -> dict[str, Any]:
    """The event (``{"type", "timestamp", "data"}``) of a webhook request whose
    ``webhook-signature`` matches ``secret`` (``whsec_…``; several during a rotation)
    and whose ``webhook-timestamp`` is recent; else ``WebhookVerificationError``."""
    secrets = [secret] if isinstance(secret, str) else list(secret)
    if not secrets:
        raise ValueError("at least one webhook secret is needed")
    plain = {k.lower(): v for k, v in headers.items()}
    error: WebhookVerificationError | None = None
    for s in secrets:
        try:
            event = Webhook(s).verify(body, plain)
        except WebhookVerificationError as exc:
            error = exc
            continue
        if not isinstance(event, dict):
            raise WebhookVerificationError("the webhook body is not a JSON object")
        return event
    assert error is not None
    raise error
