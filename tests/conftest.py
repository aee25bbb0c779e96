from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from chat_gateway.storage import Store, create_store
from tests import harness

TESTS = Path(__file__).resolve().parent
# Everything under these runs against real processes and services; `-m "not system"`
# leaves it out, and what is left (tests/unit) needs no Postgres, Redis or browser.
SYSTEM = (TESTS / "system", TESTS / "browser")


# Workers for `-n auto` (pyproject's addopts) when the system tests run: they mostly
# wait on the processes they start, so more workers than cores (measured on 2 cores).
SYSTEM_WORKERS = 4


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """How many pytest-xdist workers ``-n auto`` starts: none when only unit tests are
    asked for (``-m "not system"`` or paths under tests/unit: they take seconds, less
    than starting workers), else SYSTEM_WORKERS, or TEST_WORKERS from the environment."""
    if "TEST_WORKERS" in os.environ:
        return int(os.environ["TEST_WORKERS"])
    paths = [Path(arg.split("::")[0]).resolve() for arg in config.args]
    only_unit = paths and all(p.is_relative_to(TESTS / "unit") for p in paths)
    if only_unit or config.option.markexpr.replace(" ", "") == "notsystem":
        return 0
    return SYSTEM_WORKERS


def pytest_itemcollected(item: pytest.Item) -> None:
    """Mark every test under tests/system and tests/browser ``system``, as it is collected
    (before ``-m`` selects), so no file has to remember to."""
    if item.path.is_relative_to(SYSTEM[0]) or item.path.is_relative_to(SYSTEM[1]):
        item.add_marker(pytest.mark.system)


@pytest.fixture(params=["postgres", "sqlite"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """A started, migrated store: a throwaway Postgres database, then a SQLite file."""
    url = (
        await harness.create_database()
        if request.param == "postgres"
        else f"sqlite:///{tmp_path}/store.db"
    )
    s = create_store(url)
    await s.start()
    try:
        await s.migrate()
        yield s
    finally:
        await s.close()
        if request.param == "postgres":
            await harness.drop_database(url)


@pytest.fixture(params=["postgres", "sqlite"])
def any_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """A gateway environment on Postgres with Redis, or on SQLite alone."""
    if request.param == "postgres":
        return {**request.getfixturevalue("gateway_env"), "LOG_LEVEL": "info"}
    return harness.embedded_env(tmp_path, SUBSCRIBE_RATE_LIMIT="100000/1s")


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A throwaway Postgres database for this test."""
    url = await harness.create_database()
    try:
        yield url
    finally:
        await harness.drop_database(url)


@pytest.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A key prefix of this test's own on the machine's Redis; its keys are deleted after."""
    await harness.check_redis()
    prefix = harness.new_prefix()
    try:
        yield prefix
    finally:
        await harness.delete_prefix(prefix)


@pytest.fixture
def gateway_env(pg_url: str, redis_prefix: str) -> dict[str, str]:
    """Environment for gateways sharing this test's database and Redis prefix."""
    return {
        "DATABASE_URL": pg_url,
        "REDIS_URL": harness.REDIS_URL,
        "KEY_PREFIX": redis_prefix,
        "RATE_LIMIT": "100000/1s",
        "CONNECT_RATE_LIMIT": "100000/1s",
        "PUBLISH_RATE_LIMIT": "100000/1s",
        "SUBSCRIBE_RATE_LIMIT": "100000/1s",
        "LOG_LEVEL": "warning",
        "POSITION_INTERVAL": "1",
    }
