"""``GET /v1/search`` on real gateway processes: the shared table of queries on
Postgres (with tokens) and on the embedded SQLite store (open mode), rooms limited
by token claims, paging, highlights, bad input, the rate limit and the time bound."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest

from tests.harness import instances, post
from tests.search_cases import CASES, MESSAGES, SCOPED
from tests.system.test_auth import SECRET, token


async def post_all(client: httpx.AsyncClient, base: str, **kwargs: Any) -> list[str]:
    ids = []
    for room, text in MESSAGES:
        r = await post(client, base, room, text, **kwargs)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
        await asyncio.sleep(0.002)
    return ids


async def search(client: httpx.AsyncClient, base: str, **params: Any) -> httpx.Response:
    return await client.get(base + "/v1/search", params=params)


def found(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return [hit["message"]["id"] for hit in r.json()["results"]]


@pytest.fixture
def auth_env(gateway_env: dict[str, str]) -> dict[str, str]:
    return {**gateway_env, "AUTH_SECRET": SECRET, "SEARCH_RATE_LIMIT": "100000/1s"}


async def test_search_on_postgres_with_token_scopes(auth_env: dict[str, str]) -> None:
    async with instances(1, auth_env) as (gw,), httpx.AsyncClient(timeout=30) as client:
        everyone = {"Authorization": f"Bearer {token('ann')}"}
        ids = await post_all(client, gw.url, headers=everyone)
        client.headers.update(everyone)
        for q, expected in CASES:
            assert found(await search(client, gw.url, q=q)) == [ids[i] for i in expected], q
        # a cursor past the last time a timestamp holds starts from the newest
        r = await search(client, gw.url, q="meeting", cursor="999999999999999999.1.r")
        assert found(r) == found(await search(client, gw.url, q="meeting")), r.text
        for rooms, read_rooms, q, expected in SCOPED:
            claims = {k: list(v) for k, v in (("rooms", rooms), ("read_rooms", read_rooms)) if v}
            headers = {"Authorization": f"Bearer {token('bo', **claims)}"}
            r = await client.get(gw.url + "/v1/search", params={"q": q}, headers=headers)
            assert found(r) == [ids[i] for i in expected], (rooms, read_rooms, q)
        # Rooms asked for must be readable: 403, not an empty answer.
        headers = {"Authorization": f"Bearer {token('bo', rooms=['team:*'])}"}
        r = await client.get(
            gw.url + "/v1/search", params={"q": "release", "room": "general"}, headers=headers
        )
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden", r.text
        r = await client.get(
            gw.url + "/v1/search",
            params=[("q", "release"), ("room", "team:web"), ("room", "team:core")],
            headers=headers,
        )
        assert found(r) == [ids[6], ids[4]]
        client.headers.pop("Authorization")
        r = await search(client, gw.url, q="release")
        assert r.status_code == 401, r.text


def embedded(tmp_path: Any, **extra: str) -> dict[str, str]:
    return {
        "DATABASE_URL": f"sqlite:///{tmp_path}/search.db",
        "REDIS_URL": "memory://",
        "LOG_LEVEL": "warning",
        "RATE_LIMIT": "100000/1s",
        **extra,
    }


async def test_search_on_sqlite_pages_highlights_and_edits(tmp_path: Any) -> None:
    env = embedded(tmp_path, SEARCH_RATE_LIMIT="100000/1s")
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=30) as client:
        ids = await post_all(client, gw.url)
        for q, expected in CASES:
            assert found(await search(client, gw.url, q=q)) == [ids[i] for i in expected], q
        r = await search(client, gw.url, q="meeting")
        hit = r.json()["results"][0]
        assert hit["message"]["text"] == "meeting in the underscore room"
        assert hit["highlights"] == [[0, 7]]
        # a q with no word to find matches nothing: an empty page, not an error
        for q in ["   ", "-only -excluded", "!!! ...", '-"only this"']:
            r = await search(client, gw.url, q=q)
            assert r.status_code == 200 and r.json() == {"results": [], "next_cursor": None}, q
        # pages of two, newest first, cursor to cursor
        seen: list[str] = []
        params: dict[str, Any] = {"q": "meeting", "limit": 2}
        while True:
            body = (await search(client, gw.url, **params)).json()
            seen += [h["message"]["id"] for h in body["results"]]
            if body["next_cursor"] is None:
                break
            params["cursor"] = body["next_cursor"]
        assert seen == [ids[9], ids[2], ids[1], ids[0]]
        # an edit: found only by its new text; a delete: not at all
        r = await client.patch(
            f"{gw.url}/v1/rooms/general/messages/1",
            json={"text": "Rescheduled", "author": "tester"},
        )
        assert r.status_code == 200, r.text
        r = await client.request(
            "DELETE", f"{gw.url}/v1/rooms/general/messages/2", json={"author": "tester"}
        )
        assert r.status_code == 200, r.text
        assert found(await search(client, gw.url, q="meeting")) == [ids[9], ids[2]]
        assert found(await search(client, gw.url, q="rescheduled")) == [ids[0]]


BAD = [
    ({}, "q"),
    ({"q": ""}, "q"),
    ({"q": "x" * 501}, "q"),
    ({"q": "ok", "limit": "0"}, "limit"),
    ({"q": "ok", "limit": "101"}, "limit"),
    ({"q": "ok", "limit": "ten"}, "limit"),
    ({"q": "ok", "cursor": "nonsense"}, "cursor"),
    ({"q": "ok", "cursor": "1.2"}, "cursor"),  # no room
    ({"q": "ok", "cursor": "1.2.bad room"}, "cursor"),
    ({"q": "ok", "room": "bad room!"}, "room"),
]


async def test_bad_input_is_422_and_the_route_is_rate_limited(tmp_path: Any) -> None:
    env = embedded(tmp_path, SEARCH_RATE_LIMIT="3/60s")
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=30) as client:
        for params, field in BAD:
            r = await search(client, gw.url, **params)
            assert r.status_code == 422, (params, r.text)
            error = r.json()["error"]
            assert error["code"] == "invalid_request" and error["field"] == field, (params, error)
        r = await search(client, gw.url, q="ok", unknown="1")
        assert r.status_code == 422 and r.json()["error"]["fields"] == ["unknown"]
        r = await client.get(gw.url + "/v1/search", params=[("q", "a"), ("q", "b")])
        assert r.status_code == 422 and r.json()["error"]["field"] == "q"
        # bad input costs no token; three searches do, the fourth is refused
        for _ in range(3):
            assert (await search(client, gw.url, q="ok")).status_code == 200
        r = await search(client, gw.url, q="ok")
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited", r.text
        assert "Retry-After" in r.headers or "retry-after" in r.headers
        assert "Traceback" not in gw.log()


async def test_a_search_past_its_time_bound_is_503_and_the_pool_stays_usable(
    gateway_env: dict[str, str],
) -> None:
    import asyncpg

    env = {
        **gateway_env,
        "SEARCH_TIMEOUT": "0.3",
        "DB_POOL_MAX": "2",
        "SEARCH_RATE_LIMIT": "1000/1s",
    }
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=30) as client:
        assert (await post(client, gw.url, "r", "findable words")).status_code == 201
        conn = await asyncpg.connect(gateway_env["DATABASE_URL"])
        try:
            tx = conn.transaction()
            await tx.start()
            await conn.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
            # more stuck searches than the pool has connections: each ends on time
            replies = await asyncio.gather(
                *(search(client, gw.url, q="findable") for _ in range(4))
            )
            await tx.rollback()
        finally:
            await conn.close()
        for r in replies:
            assert r.status_code == 503, r.text
            assert "took longer than 0.3 s" in r.json()["error"]["message"]
        r = await search(client, gw.url, q="findable")
        assert len(found(r)) == 1
        assert orjson.loads(r.content)["next_cursor"] is None


def test_the_openapi_document_describes_search() -> None:
    from openapi_spec_validator import validate

    from chat_gateway.server.openapi import document

    doc = document()
    validate(doc)  # type: ignore[arg-type]
    op = doc["paths"]["/v1/search"]["get"]
    params = {p["name"]: p for p in op["parameters"]}
    assert set(params) == {"q", "room", "limit", "cursor"}
    assert params["q"]["required"] and not params["room"]["required"]
    assert params["room"]["schema"]["type"] == "array" and params["room"]["explode"]
    assert params["limit"]["schema"]["maximum"] == 100
    assert {"200", "422", "429", "503"} <= set(op["responses"])
