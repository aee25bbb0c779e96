"""verify_webhook accepts what a Standard Webhooks sender signs (the gateway's
headers: webhook-id, webhook-timestamp, webhook-signature) and refuses the rest."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

import pytest
from chat_gateway_client import WebhookVerificationError, verify_webhook
from standardwebhooks.webhooks import Webhook

OLD = "whsec_" + base64.b64encode(b"old-secret-0123456789abcdef0123").decode()
NEW = "whsec_" + base64.b64encode(b"new-secret-0123456789abcdef0123").decode()
EVENT = {
    "type": "message.created",
    "timestamp": "2026-11-28T06:00:00Z",
    "data": {
        "id": "01J",
        "room": "r",
        "seq": 1,
        "author": "ana",
        "text": "hi",
        "created_at": "2026-11-28T06:00:00Z",
    },
}


def signed(secrets: list[str], body: str, when: datetime | None = None) -> dict[str, str]:
    when = when or datetime.now(UTC)
    sigs = " ".join(Webhook(s).sign("msg_1", when, body) for s in secrets)
    return {
        "Webhook-Id": "msg_1",
        "Webhook-Timestamp": str(int(when.timestamp())),
        "Webhook-Signature": sigs,
    }


def test_a_signed_request_verifies_and_gives_the_event() -> None:
    body = json.dumps(EVENT)
    assert verify_webhook(OLD, body.encode(), signed([OLD], body)) == EVENT


def test_rotation_either_secret_on_either_side() -> None:
    body = json.dumps(EVENT)
    both = signed([OLD, NEW], body)  # the gateway signs with each of its secrets
    assert verify_webhook(NEW, body, both) == EVENT
    assert verify_webhook([NEW, OLD], body, signed([OLD], body)) == EVENT


@pytest.mark.parametrize("case", ["tampered", "wrong secret", "stale", "no signature"])
def test_refused(case: str) -> None:
    body = json.dumps(EVENT)
    headers = signed([OLD], body)
    secret = OLD
    if case == "tampered":
        body = body.replace('"hi"', '"bye"')
    elif case == "wrong secret":
        secret = NEW
    elif case == "stale":
        headers = signed([OLD], body, datetime.now(UTC) - timedelta(hours=1))
    else:
        del headers["Webhook-Signature"]
    with pytest.raises(WebhookVerificationError):
        verify_webhook(secret, body, headers)
