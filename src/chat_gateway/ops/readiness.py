"""``/readyz``: whether this instance can serve, dependency by dependency.

Each ``/readyz`` probes every dependency (``Readiness.check``). A scrape of
``/metrics`` sets ``chat_ready`` too, but from a probe round at most
``SCRAPE_REUSE`` seconds old when there is one (``Readiness.recent``), and the
scrapes that find none share one new round: however many Prometheus servers
scrape, and however often, the database and the broker see at most about one
probe round a second from scrapes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

READY_TIMEOUT = 2.0  # seconds each /readyz probe may take
SCRAPE_REUSE = 1.0  # seconds a scrape may reuse a probe round for, from its start

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
        reuse: float = SCRAPE_REUSE,
    ) -> None:
        self.probes = probes
        self.closing = closing
        self.told = told  # given each outcome (the chat_ready gauge)
        self.timeout = timeout
        self.reuse = reuse
        self._given_up: set[asyncio.Task[Any]] = set()  # probes given up on, until they end
        # The last probe round: when it started (time.monotonic) and what it found.
        self._last: tuple[float, dict[str, Any]] | None = None
        self._round: asyncio.Future[dict[str, Any]] | None = None  # the scrapes' round

    async def check(self) -> tuple[bool, dict[str, Any]]:
        """Probe each dependency (``/readyz``: a round of its own every time);
        whether all answered and the instance is not closing, and each one's result."""
        return self._outcome(await self._probe())

    async def recent(self) -> bool:
        """The outcome for a scrape: from the last probe round if it started at most
        ``reuse`` seconds ago (a ``/readyz``'s or a scrape's), else from a new round
        shared with every scrape that comes while it runs. Closing is asked now."""
        last = self._last
        if last is not None and time.monotonic() - last[0] <= self.reuse:
            return self._outcome(last[1])[0]
        if self._round is None:
            self._round = asyncio.ensure_future(self._probe())
            self._round.add_done_callback(self._round_done)
        # A scrape that goes away leaves the round to the others waiting for it.
        return self._outcome(await asyncio.shield(self._round))[0]

    def _round_done(self, done: asyncio.Future[dict[str, Any]]) -> None:
        if self._round is done:
            self._round = None

    def _outcome(self, results: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        ok = all(r["ok"] for r in results.values()) and not self.closing()
        self.told(ok)
        return ok, results

    async def _probe(self) -> dict[str, Any]:
        """One round: every dependency probed at once, answered within ``timeout``
        whatever the network does: a probe still running then is reported failed
        and left to end in the background (waiting for its cancellation could take
        as long as the link)."""
        started = time.monotonic()
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
        if self._last is None or self._last[0] <= started:
            self._last = (started, results)
        return results
