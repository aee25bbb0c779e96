"""Connection limits: how many WebSocket and SSE connections this instance holds,
in all and per identity. A refusal happens before the upgrade or the stream
starts, as an HTTP error body: 503 ``unavailable`` when the instance is full
(a load balancer retries elsewhere), 429 ``too_many_connections`` when the
identity holds too many. The counts are per instance: behind a balancer an
identity may hold up to the per-identity limit on each instance.
"""

from __future__ import annotations

from collections import Counter

from chat_gateway.errors import ApiError


class ConnectionLimits:
    def __init__(self, total: int = 0, per_identity: int = 0) -> None:
        self.total = total  # 0: no limit
        self.per_identity = per_identity
        self.count = 0
        self.by_identity: Counter[str] = Counter()

    def acquire(self, identity: str) -> None:
        """Count one more connection for ``identity``, or raise the refusal."""
        if self.total and self.count >= self.total:
            raise ApiError(
                "unavailable",
                f"this instance holds its limit of {self.total} connections; retry on another",
                headers={"Retry-After": "1"},
            )
        if self.per_identity and self.by_identity[identity] >= self.per_identity:
            raise ApiError(
                "too_many_connections",
                f"this identity already holds {self.per_identity} connections "
                "on this instance; close one first",
                limit=self.per_identity,
            )
        self.count += 1
        self.by_identity[identity] += 1

    def release(self, identity: str) -> None:
        """Give back a place ``acquire`` counted."""
        self.count -= 1
        self.by_identity[identity] -= 1
        if self.by_identity[identity] <= 0:
            del self.by_identity[identity]
