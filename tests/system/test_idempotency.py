"""Idempotency-Key over HTTP on both stores: scoped to (room, identity), a reused key
with another body is a conflict, a retry with the same body returns the first message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests import harness
from tests.harness import Instance
from tests.system.test_auth import SECRET, bearer, token


@pytest.fixture(params=["postgres", "sqlite"])
async def store_env(request, tmp_path) -> AsyncIterator[dict[str, str]]:
    """A gateway environment on a throwaway Postgres database or SQLite file."""
    if request.param == "postgres":
        url = await harness.create_database()
    else:
        url = f"sqlite:///{tmp_path}/idem.db"
    try:
        yield {
            "DATABASE_URL": url,
            "REDIS_URL": "memory://",
            "LOG_LEVEL": "warning",
            "RATE_LIMIT": "100000/1s",
            "CONNECT_RATE_LIMIT": "100000/1s",
        }
    finally:
        if request.param == "postgres":
            await harness.drop_database(url)


async def gateway(env: dict[str, str]) -> Instance:
    return await Instance(env).start().wait_ready()


async def post(
    http: httpx.AsyncClient, gw: Instance, text: str, key: str, headers: dict[str, str], **body: Any
) -> httpx.Response:
    return await http.post(
        f"{gw.url}/v1/rooms/shop/messages",
        json={"text": text, **body},
        headers={"Idempotency-Key": key, **headers},
    )


async def texts(http: httpx.AsyncClient, gw: Instance) -> list[tuple[str, str]]:
    page = (
        await http.get(f"{gw.url}/v1/rooms/shop/messages", headers=bearer(token("reader")))
    ).json()
    return [(m["author"], m["text"]) for m in page["messages"]]


async def test_a_key_is_scoped_to_the_identity_in_auth_mode(store_env):
    gw = await gateway({**store_env, "AUTH_SECRET": SECRET})
    mallory, alice = bearer(token("mallory")), bearer(token("alice"))
    try:
        async with httpx.AsyncClient(timeout=harness.t(10)) as http:
            first = await post(http, gw, "send it to me", "order-42", mallory)
            assert first.status_code == 201
            theirs = await post(http, gw, "ship to alice", "order-42", alice)
            assert theirs.status_code == 201, "another identity's key never answers for her"
            assert theirs.json()["author"] == "alice"
            assert theirs.json()["text"] == "ship to alice"
            assert theirs.json()["seq"] == 2
            # Each identity's retry with the same body gets its own first message.
            again = await post(http, gw, "ship to alice", "order-42", alice)
            assert again.status_code == 200 and again.json() == theirs.json()
            again = await post(http, gw, "send it to me", "order-42", mallory)
            assert again.status_code == 200 and again.json() == first.json()
            # The same identity reusing the key for another text: refused, nothing stored.
            conflict = await post(http, gw, "ship to alice, twice", "order-42", alice)
            assert conflict.status_code == 409
            assert conflict.json()["error"]["code"] == "idempotency_conflict"
            assert await texts(http, gw) == [
                ("mallory", "send it to me"),
                ("alice", "ship to alice"),
            ]
            nxt = await post(http, gw, "next", "order-43", alice)
            assert nxt.status_code == 201 and nxt.json()["seq"] == 3, (
                "a refused repeat consumes no seq"
            )
    finally:
        assert gw.stop() == 0


async def test_a_key_is_scoped_to_the_client_address_in_open_mode(store_env):
    gw = await gateway({**store_env, "TRUSTED_PROXIES": "127.0.0.1"})
    one, two = {"X-Forwarded-For": "198.51.100.1"}, {"X-Forwarded-For": "198.51.100.2"}
    try:
        async with httpx.AsyncClient(timeout=harness.t(10)) as http:
            first = await post(http, gw, "hi", "k", one, author="ana")
            assert first.status_code == 201
            other = await post(http, gw, "hi", "k", two, author="ana")
            assert other.status_code == 201 and other.json()["id"] != first.json()["id"]
            again = await post(http, gw, "hi", "k", one, author="ana")
            assert again.status_code == 200 and again.json() == first.json()
            # In open mode the author is part of the body: another author is a conflict.
            conflict = await post(http, gw, "hi", "k", one, author="bo")
            assert conflict.status_code == 409
            assert conflict.json()["error"]["code"] == "idempotency_conflict"
            assert await texts(http, gw) == [("ana", "hi"), ("ana", "hi")]
    finally:
        assert gw.stop() == 0


async def test_concurrent_posts_with_one_key(store_env):
    gw = await gateway({**store_env, "AUTH_SECRET": SECRET})
    alice, bob = bearer(token("alice")), bearer(token("bob"))
    try:
        async with httpx.AsyncClient(timeout=harness.t(30)) as http:
            # One identity's concurrent retries store one message; another identity's
            # concurrent posts with the same key store theirs, once.
            rs = await asyncio.gather(
                *(
                    post(http, gw, f"from {who}", "pay-7", headers)
                    for _ in range(8)
                    for who, headers in (("alice", alice), ("bob", bob))
                )
            )
            by_author: dict[str, list[httpx.Response]] = {"alice": [], "bob": []}
            for r in rs:
                assert r.status_code in (200, 201), r.text
                by_author[r.json()["author"]].append(r)
            for who, answers in by_author.items():
                assert sorted(r.status_code for r in answers) == [200] * 7 + [201]
                assert len({r.json()["id"] for r in answers}) == 1
                assert answers[0].json()["text"] == f"from {who}"
            assert sorted(await texts(http, gw)) == [("alice", "from alice"), ("bob", "from bob")]
            # Concurrent posts of one identity with one key and different texts:
            # one is stored, every other one is a conflict.
            rs = await asyncio.gather(
                *(post(http, gw, f"variant {i}", "pay-8", alice) for i in range(8))
            )
            assert sorted(r.status_code for r in rs) == [201] + [409] * 7
            assert len(await texts(http, gw)) == 3
    finally:
        assert gw.stop() == 0
