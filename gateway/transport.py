"""uvicorn's sans-I/O WebSocket protocol, made to let go of peers that stopped reading.

asyncio's ``transport.close()`` waits for the write buffer to drain, which a
peer that stopped reading never lets happen: the socket would stay open for
good. Here a connection whose handler has ended, or whose keepalive ping went
unanswered, is aborted once the close handshake had its chance
(``close_timeout``), so a slow or dead client costs nothing after it is dropped.
"""

from __future__ import annotations

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


class WebSocketProtocol(WebSocketsSansIOProtocol):
    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.close_timeout = 3.0  # seconds a close handshake may take before the abort

    def _abort_if_stuck(self) -> None:
        if self.transport.get_write_buffer_size() > 0 or not self.transport.is_closing():
            self.transport.abort()

    async def run_asgi(self) -> None:
        await super().run_asgi()
        self.loop.call_later(self.close_timeout + 0.5, self._abort_if_stuck)

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        if self.transport.get_write_buffer_size() > 0:
            self.transport.abort()
