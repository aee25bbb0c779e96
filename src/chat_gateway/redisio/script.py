"""Lua scripts sent by digest, and by body to a Redis that does not know them.

Every script call goes as ``EVALSHA``: one round trip, the body not sent. A
Redis that does not have the script (restarted, flushed, a replica promoted
after a failover) refuses with ``NOSCRIPT`` and runs nothing; the call then
goes once more as ``EVAL`` with the body, which runs it and caches it there.

redis-py's own ``Script`` answers ``NOSCRIPT`` with ``SCRIPT LOAD`` instead.
Over a cluster that command goes to every primary, so it fails while any one
of them is down, and a shard that lost its scripts could not run them even
though its own node is up. ``EVAL`` goes where the call's keys live, like
``EVALSHA``, on one Redis or a cluster alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from redis.exceptions import NoScriptError

from chat_gateway.redisio.pipelined import PipelinedConnection


class Script:
    def __init__(self, redis: Any, source: str) -> None:
        self.redis = redis
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def command(self, keys: Sequence[Any], args: Sequence[Any] = ()) -> tuple[Any, ...]:
        """The call as one ``EVALSHA`` command, to send with others (chat_gateway.redisio.pipelined)."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    async def __call__(
        self,
        keys: Sequence[Any] = (),
        args: Sequence[Any] = (),
        *,
        batch: PipelinedConnection | None = None,
    ) -> Any:
        """The script's reply; over ``batch`` (a pipelined connection to the same
        Redis) when given, else the client."""
        if batch is not None:
            (reply,) = await batch.run([self.command(keys, args)])
            if not isinstance(reply, BaseException):
                return reply
            if not isinstance(reply, NoScriptError):
                raise reply
        else:
            try:
                return await self.redis.execute_command(*self.command(keys, args))
            except NoScriptError:
                pass
        return await self.again(keys, args)

    async def again(self, keys: Sequence[Any], args: Sequence[Any] = ()) -> Any:
        """The call with the script's body, after a ``NOSCRIPT`` (which ran nothing)."""
        return await self.redis.execute_command("EVAL", self.source, len(keys), *keys, *args)
