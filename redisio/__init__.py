"""Redis access shared by the broker, the history cache and the gateway's keys.

- :mod:`redisio.urls`: what a ``REDIS_URL`` names (one server, Sentinel, Cluster);
- :mod:`redisio.clients`: the redis-py clients built from it;
- :mod:`redisio.pipelined`: one connection whose commands many callers share,
  pipelined (:class:`~redisio.pipelined.PipelinedConnection`), and
  :func:`~redisio.pipelined.per_key` over it or a cluster;
- :mod:`redisio.script`: Lua scripts sent by digest;
- :mod:`redisio.guard`: the cooldown that skips Redis right after it failed.

Nothing here knows of Pub/Sub, rooms or messages.
"""
