"""asyncio client for chat-gateway.

``async with Client(url, token=...) as client`` connects; ``client.messages(room,
since=N)`` iterates a room's messages in seq order, each once, across reconnections;
``client.publish`` / ``client.post`` store a message exactly once; the server API and
ephemeral events take an ``api_key``; ``verify_webhook`` checks webhook signatures.
"""

from chat_gateway_client.client import Client, State, backoff, token_expiry
from chat_gateway_client.errors import CloseCode, GatewayError
from chat_gateway_client.events import (
    Change,
    Event,
    Message,
    Page,
    Presence,
    Reaction,
    ReactionsUpdated,
    Read,
    ReadState,
    RepliesPage,
    StateChange,
    Subscribed,
    Thread,
    ThreadUpdated,
    Typing,
    Unsubscribed,
    Version,
)
from chat_gateway_client.webhooks import WebhookVerificationError, verify_webhook

__version__ = "0.1.0"

__all__ = [
    "Change",
    "Client",
    "CloseCode",
    "Event",
    "GatewayError",
    "Message",
    "Page",
    "Presence",
    "Reaction",
    "ReactionsUpdated",
    "Read",
    "ReadState",
    "RepliesPage",
    "Thread",
    "ThreadUpdated",
    "Version",
    "State",
    "StateChange",
    "Subscribed",
    "Typing",
    "Unsubscribed",
    "WebhookVerificationError",
    "backoff",
    "token_expiry",
    "verify_webhook",
]
