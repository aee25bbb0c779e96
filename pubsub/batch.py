"""Redis commands that callers issue at the same moment, sent in one pipeline.

Each caller hands over its commands and gets their replies back, an error
reply as an exception instance in its place (as ``execute(raise_on_error=False)``
gives them); a failure of the whole pipeline (connection lost, timeout) is
raised to every caller in it. Commands leave in the order queued and Redis
runs each one atomically, so sharing a pipeline changes no command's effect;
it saves each caller its own round trip and the client's per-command work.
Up to ``FLIGHTS`` pipelines are in flight at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

Command = tuple[Any, ...]


class CommandBatch:
    FLIGHTS = 2
    MAX = 512  # commands per pipeline (one caller's are never split)

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._waiting: list[tuple[list[Command], asyncio.Future[list[Any]]]] = []
        self._flights = 0

    async def run(self, commands: list[Command]) -> list[Any]:
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._waiting.append((commands, future))
        if self._flights < self.FLIGHTS:
            self._flights += 1
            asyncio.ensure_future(self._send())
        return await future

    async def _send(self) -> None:
        try:
            while self._waiting:
                group: list[tuple[list[Command], asyncio.Future[list[Any]]]] = []
                n = 0
                while self._waiting and (not group or n + len(self._waiting[0][0]) <= self.MAX):
                    group.append(self._waiting.pop(0))
                    n += len(group[-1][0])
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for commands, _future in group:
                            for command in commands:
                                pipe.execute_command(*command)
                        replies = await pipe.execute(raise_on_error=False)
                except Exception as exc:  # noqa: BLE001 - each caller decides what to do
                    for _commands, future in group:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                i = 0
                for commands, future in group:
                    if not future.done():
                        future.set_result(list(replies[i:i + len(commands)]))
                    i += len(commands)
        finally:
            self._flights -= 1
