"""``/readyz``: whether this instance can serve, dependency by dependency."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

READY_TIMEOUT = 2.0  # seconds each /readyz probe may take

Probe = Callable[[], Awaitable[None]]


class Readiness:
    """Probes each named dependency (``probes``: a ping that raises when it cannot be
    reached); unready too while ``closing`` says the instance shuts down."""

    def __init__(
        self,
        probes: dict[str, Probe],
        closing: Callable[[], bool],
        timeout: float = READY_TIMEOUT,
        *,
        told: Callable[[bool], None] = lambda ok: None,
    ) -> None:
        self.probes = probes
        self.closing = closing
        self.told = told  # given each outcome (the chat_ready gauge)
        self.timeout = timeout
        self._given_up: set[asyncio.Task[Any]] = set()  # probes given up on, until they end

    async def check(self) -> tuple[bool, dict[str, Any]]:
        """Probe each dependency; answered within ``timeout`` whatever the network
        does: a probe still running then is reported failed and left to end in the
        background (waiting for its cancellation could take as long as the link)."""
        t0 = time.perf_counter()

        def took() -> float:
            return round((time.perf_counter() - t0) * 1000, 2)

        async def check(probe: Probe) -> dict[str, Any]:
            try:
                await probe()
            except Exception as exc:
                return {"ok": False, "error": str(exc) or type(exc).__name__, "latency_ms": took()}
            return {"ok": True, "latency_ms": took()}

        probes = {name: asyncio.ensure_future(check(probe)) for name, probe in self.probes.items()}
        try:
            await asyncio.wait(probes.values(), timeout=self.timeout)
        finally:
            for task in probes.values():
                if not task.done():
                    task.cancel()
                    self._given_up.add(task)  # held until it ends
                    task.add_done_callback(self._given_up.discard)
        results = {
            name: task.result()
            if task.done() and not task.cancelled()
            else {
                "ok": False,
                "error": f"no answer within {self.timeout:g} s",
                "latency_ms": took(),
            }
            for name, task in probes.items()
        }
        ok = all(r["ok"] for r in results.values()) and not self.closing()
        self.told(ok)
        return ok, results
