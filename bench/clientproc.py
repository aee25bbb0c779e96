"""What every client process of the bench shares (``bench.subscribers``,
``bench.idle_clients``, ``bench.state_subscribers``): a line to the bench on
stdout, the report written and the sockets closed at the end, and the start
under uvloop from the JSON config in ``argv[1]``."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine, Iterable
from typing import Any, Protocol

import orjson

from bench.procs import raise_open_files


class Closable(Protocol):
    def close(self) -> None: ...


def say(line: str) -> None:
    """One line to the bench, at once."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def finish(
    out: str, result: dict[str, Any], clients: Iterable[Closable], linger: float
) -> None:
    """Write ``result`` to ``out``, say ``done``, close ``clients`` and give their
    close frames ``linger`` seconds to leave."""
    with open(out, "wb") as f:
        f.write(orjson.dumps(result))
    say("done")
    for c in clients:
        c.close()
    await asyncio.sleep(linger)


def run(main: Callable[[dict[str, Any]], Coroutine[Any, Any, None]]) -> None:
    """``main(config)`` with the open-files limit raised, under uvloop if installed."""
    raise_open_files()
    config = orjson.loads(sys.argv[1])
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        asyncio.run(main(config))
    else:
        uvloop.run(main(config))
