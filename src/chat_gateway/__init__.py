"""chat-gateway: the HTTP/WebSocket/SSE edge, the hub, auth and rate limits."""

__version__ = "0.1.0"
