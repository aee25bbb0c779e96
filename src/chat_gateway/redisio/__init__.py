"""Redis access shared by the broker, the history cache and the gateway's keys.

- :mod:`chat_gateway.redisio.urls`: what a ``REDIS_URL`` names (one server, Sentinel, Cluster);
- :mod:`chat_gateway.redisio.clients`: the redis-py clients built from it;
- :mod:`chat_gateway.redisio.pipelined`: one connection whose commands many callers share,
  pipelined (:class:`~chat_gateway.redisio.pipelined.PipelinedConnection`), and
  :func:`~chat_gateway.redisio.pipelined.per_key` over it or a cluster;
- :mod:`chat_gateway.redisio.script`: Lua scripts sent by digest;
- :mod:`chat_gateway.redisio.guard`: the cooldown that skips Redis right after it failed.

Nothing here knows of Pub/Sub, rooms or messages.
"""
