"""Real gateways for the client's tests, from the repository's test harness: a
throwaway Postgres database and a Redis key prefix per test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests import harness


@pytest.fixture
async def gateway_env() -> AsyncIterator[dict[str, str]]:
    await harness.check_redis()
    url = await harness.create_database(tag="cgsdkpy")
    prefix = harness.new_prefix("cgsdkpy")
    try:
        yield {
            "DATABASE_URL": url,
            "REDIS_URL": harness.REDIS_URL,
            "KEY_PREFIX": prefix,
            "RATE_LIMIT": "100000/1s",
            "CONNECT_RATE_LIMIT": "100000/1s",
            "PUBLISH_RATE_LIMIT": "100000/1s",
            "LOG_LEVEL": "warning",
            "POSITION_INTERVAL": "1",
        }
    finally:
        await harness.drop_database(url)
        await harness.delete_prefix(prefix)
