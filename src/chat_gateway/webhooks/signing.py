"""Standard Webhooks signatures (https://www.standardwebhooks.com/).

A secret is ``whsec_`` and the base64 of its key bytes. The signature of one
request is ``v1,`` and the base64 of HMAC-SHA256(key, ``id.timestamp.body``);
with several secrets (a rotation) the header carries one per secret, separated
by spaces, and a receiver accepts the request if any of them matches.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time

PREFIX = "whsec_"
MIN_KEY_BYTES = 24  # the spec's lower bound for a secret
MAX_KEY_BYTES = 64


def parse_secrets(text: str) -> list[bytes]:
    """The key bytes of each ``whsec_`` secret in a space-separated list."""
    keys = []
    for part in text.split():
        if not part.startswith(PREFIX):
            raise ValueError(f"a secret must start with {PREFIX!r}")
        try:
            key = base64.b64decode(part[len(PREFIX) :], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"a secret is {PREFIX} followed by base64") from None
        if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
            raise ValueError(
                f"a secret's key must be {MIN_KEY_BYTES}..{MAX_KEY_BYTES} bytes, not {len(key)}"
            )
        keys.append(key)
    if not keys:
        raise ValueError("no secret given")
    return keys


def sign(keys: list[bytes], event_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: one ``v1,<base64>`` per key."""
    content = f"{event_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.new(key, content, hashlib.sha256).digest()).decode()
        for key in keys
    )


def signed_headers(keys: list[bytes], event_id: str, body: bytes) -> dict[str, str]:
    """The headers of a JSON request signed now: ``webhook-id``, ``-timestamp`` and
    ``-signature`` as the spec names them."""
    timestamp = int(time.time())
    return {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(keys, event_id, timestamp, body),
    }
