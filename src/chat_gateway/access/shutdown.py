"""Whether this instance still takes new work.

Set once the instance begins to shut down (the CLI's drain, then ``Gateway.close``):
from then on a post, a change or a connection is answered 503 ``unavailable`` so a
load balancer retries it on another instance, and ``/readyz`` says unready.
"""

from __future__ import annotations

from chat_gateway.errors import ApiError


class Shutdown:
    def __init__(self) -> None:
        self.closing = False

    def begin(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def ensure_open(self) -> None:
        """Refuse new work (a post, a change, a connection) once the instance shuts down."""
        if self.closing:
            raise ApiError("unavailable", "the instance is shutting down; retry on another")
