"""Bad input on every way in gets the documented error body or frame and changes
nothing: a refused post stores nothing and consumes no seq."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import jwt
import orjson
import pytest
import websockets

from tests.harness import (
    WSClient,
    embedded_env,
    instances,
    no_errors,
    post,
    t,
)
from tests.system.test_auth import SECRET, token


@pytest.fixture
def env(gateway_env: dict[str, str]) -> dict[str, str]:
    return {**gateway_env, "MAX_BODY_BYTES": "8192", "WS_MAX_SIZE": "8192"}


def assert_error(r: httpx.Response, status: int, code: str, case: Any = None) -> None:
    assert r.status_code == status, (case, r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, case
    assert body["error"]["code"] == code, (case, body)
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], case


MSG = "/v1/rooms/r/messages"
HTTP_CASES: list[tuple[str, str, dict[str, Any], int, str]] = [
    # bodies
    ("POST", MSG, {"content": b"{"}, 400, "invalid_json"),
    ("POST", MSG, {"content": b""}, 400, "invalid_json"),
    ("POST", MSG, {"content": b'{"text": "\\ud800"}'}, 400, "invalid_json"),
    ("POST", MSG, {"content": b'{"text": "\xff"}'}, 400, "invalid_json"),
    ("POST", MSG, {"content": b"[" * 1030 + b"]" * 1010}, 400, "invalid_json"),  # too deep
    ("POST", MSG, {"content": b"[1]"}, 422, "invalid_request"),
    ("POST", MSG, {"content": b'"text"'}, 422, "invalid_request"),
    ("POST", MSG, {"json": {}}, 422, "invalid_request"),
    ("POST", MSG, {"json": {"text": 5}}, 422, "invalid_request"),
    ("POST", MSG, {"json": {"text": None}}, 422, "invalid_request"),
    ("POST", MSG, {"json": {"text": ""}}, 422, "invalid_request"),
    ("POST", MSG, {"json": {"text": " \n\t\u3000"}}, 422, "invalid_request"),
    ("POST", MSG, {"json": {"text": "a" * 4001}}, 422, "invalid_request"),
    ("POST", MSG, {"json": {"text": "a\x00b"}}, 422, "invalid_request"),
    ("POST", MSG, {"json": {"text": "hi", "extra": 1}}, 422, "invalid_request"),
    ("POST", MSG, {"json": {"text": "hi", "author": ""}}, 422, "invalid_request"),
    ("POST", MSG, {"json": {"text": "hi", "author": "a" * 65}}, 422, "invalid_request"),
    ("POST", MSG, {"json": {"text": "hi", "author": 5}}, 422, "invalid_request"),
    ("POST", MSG, {"json": {"text": "hi", "author": "a\x00"}}, 422, "invalid_request"),
    (
        "POST",
        MSG,
        {"json": {"text": "hi"}, "headers": {"Idempotency-Key": "k" * 129}},
        422,
        "invalid_request",
    ),
    # room names
    ("POST", "/v1/rooms/-bad/messages", {"json": {"text": "hi"}}, 422, "invalid_request"),
    ("POST", f"/v1/rooms/{'a' * 129}/messages", {"json": {"text": "hi"}}, 422, "invalid_request"),
    ("POST", "/v1/rooms/a%20b/messages", {"json": {"text": "hi"}}, 422, "invalid_request"),
    ("POST", "/v1/rooms/caf%C3%A9/messages", {"json": {"text": "hi"}}, 422, "invalid_request"),
    ("POST", "/v1/rooms/%00x/messages", {"json": {"text": "hi"}}, 422, "invalid_request"),
    ("POST", "/v1/rooms/.x/messages", {"json": {"text": "hi"}}, 422, "invalid_request"),
    ("GET", "/v1/rooms/a*/messages", {}, 422, "invalid_request"),
    ("POST", "/v1/rooms//messages", {"json": {"text": "hi"}}, 404, "not_found"),
    ("PUT", MSG, {"json": {"text": "hi"}}, 405, "method_not_allowed"),
    # query parameters
    *[
        ("GET", MSG, {"params": {"limit": bad}}, 422, "invalid_request")
        for bad in ("0", "201", "-1", "abc", "1.5", "", "\u0661", "9" * 30)
    ],
    ("GET", MSG, {"params": {"before": "x"}}, 422, "invalid_request"),
    ("GET", MSG, {"params": {"after": "9" * 20}}, 422, "invalid_request"),
    ("GET", MSG, {"params": {"foo": "1"}}, 422, "invalid_request"),
    ("POST", MSG, {"json": {"text": "hi"}, "params": {"token": "x"}}, 422, "invalid_request"),
    ("GET", "/v1/rooms/r/events", {"params": {"since": "-1"}}, 422, "invalid_request"),
    ("GET", "/v1/rooms/r/events", {"params": {"foo": "1"}}, 422, "invalid_request"),
    ("GET", "/v1/rooms/r/events", {"params": {"user": "u" * 65}}, 422, "invalid_request"),
    ("GET", "/v1/rooms/r/presence", {"params": {"foo": "1"}}, 422, "invalid_request"),
    ("GET", "/v1/rooms/r/events", {"headers": {"Last-Event-ID": "abc"}}, 422, "invalid_request"),
    ("GET", "/v1/rooms/-r/events", {}, 422, "invalid_request"),
    # /v1/publish
    ("POST", "/v1/publish", {"content": b"{"}, 400, "invalid_json"),
    ("POST", "/v1/publish", {"json": {"room": "r"}}, 422, "invalid_request"),
    ("POST", "/v1/publish", {"json": {"room": "r", "event": "message"}}, 422, "invalid_request"),
    (
        "POST",
        "/v1/publish",
        {"json": {"room": "r", "event": "e", "data": []}},
        422,
        "invalid_request",
    ),
    ("POST", "/v1/publish", {"json": {"room": "r", "event": "e", "x": 1}}, 422, "invalid_request"),
    ("POST", "/v1/publish", {"json": {"room": "r r", "event": "e"}}, 422, "invalid_request"),
    ("POST", "/v1/publish", {"content": b"x" * 9000}, 413, "too_large"),
    (
        "POST",
        "/v1/publish",
        {"json": {"room": "r", "event": "e"}, "params": {"a": "1"}},
        422,
        "invalid_request",
    ),
    ("GET", "/nowhere", {}, 404, "not_found"),
]


async def test_bad_http_input_gets_the_error_body_and_changes_nothing(env):
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        for method, path, kwargs, status, code in HTTP_CASES:
            r = await http.request(method, gw.url + path, **kwargs)
            assert_error(r, status, code, (method, path, kwargs))
        for query in ("?foo=1", "?user=" + "u" * 65):
            with pytest.raises(websockets.InvalidStatus) as exc:
                async with WSClient.connect(gw.ws_url + query):
                    pass
            assert exc.value.response.status_code == 422
        async with WSClient.connect(gw.ws_url + "?user=ana") as ws:
            assert (await ws.subscribe("r"))["seq"] == 0

        page = (await http.get(gw.url + MSG)).json()
        assert page == {"messages": [], "has_more": False}
        # nothing consumed a seq; the longest text after trimming is accepted
        r = await http.post(gw.url + MSG, json={"text": "  " + "a" * 4000 + "\n"})
        assert r.status_code == 201, r.text
        assert r.json()["seq"] == 1 and r.json()["text"] == "a" * 4000


async def raw_request(port: int, head: bytes, parts: list[bytes]) -> bytes:
    """Send ``head`` and ``parts`` without ever finishing the body; return the response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        for part in parts:
            writer.write(part)
            await writer.drain()
        head_bytes = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), t(10))
        length = next(
            int(line.split(b":")[1])
            for line in head_bytes.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return head_bytes + await asyncio.wait_for(reader.readexactly(length), t(10))
    finally:
        writer.close()


async def test_bodies_are_refused_at_the_cap_before_they_are_read_whole(env):
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        host = f"Host: 127.0.0.1:{gw.port}\r\nContent-Type: application/json\r\n"
        # a declared length past the cap: refused with no byte of the body sent
        head = (f"POST {MSG} HTTP/1.1\r\n{host}Content-Length: 10000000\r\n\r\n").encode()
        response = await raw_request(gw.port, head, [])
        assert response.startswith(b"HTTP/1.1 413 "), response[:200]
        assert b'"too_large"' in response
        # chunked, no length: refused once 8192 bytes have come, the body still open
        head = (f"POST {MSG} HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n\r\n").encode()
        chunk = b"400\r\n" + b"x" * 0x400 + b"\r\n"
        response = await raw_request(gw.port, head, [chunk] * 9)
        assert response.startswith(b"HTTP/1.1 413 "), response[:200]
        assert b'"too_large"' in response
        assert (await http.get(gw.url + MSG)).json()["messages"] == []


WS_CASES: list[tuple[Any, str]] = [
    ("not json", "invalid_json"),
    ("", "invalid_json"),
    ("[]", "invalid_request"),
    ("{}", "invalid_request"),
    ({"type": "nope"}, "invalid_request"),
    ({"type": 5}, "invalid_request"),
    ({"type": {"a": 1}}, "invalid_request"),
    ({"type": ["ping"]}, "invalid_request"),
    ({"type": "subscribe"}, "invalid_request"),
    ({"type": "subscribe", "room": "-x"}, "invalid_request"),
    ({"type": "subscribe", "room": "r", "since": -1}, "invalid_request"),
    ({"type": "subscribe", "room": "r", "since": 1.5}, "invalid_request"),
    ({"type": "subscribe", "room": "r", "since": True}, "invalid_request"),
    ({"type": "subscribe", "room": "r", "extra": 1}, "invalid_request"),
    ({"type": "unsubscribe"}, "invalid_request"),
    ({"type": "publish", "room": "r", "text": "", "ref": "e1"}, "invalid_request"),
    ({"type": "publish", "room": "r", "text": "a\x00", "ref": "e2"}, "invalid_request"),
    ({"type": "publish", "room": "r", "text": "a" * 4001, "ref": "e3"}, "invalid_request"),
    ({"type": "publish", "room": "r", "text": 5, "ref": "e4"}, "invalid_request"),
    ({"type": "publish", "room": "r", "text": "hi", "author": 5, "ref": "e5"}, "invalid_request"),
    ({"type": "publish", "room": "r r", "text": "hi", "ref": "e6"}, "invalid_request"),
    ({"type": "publish", "room": "r", "text": "hi", "ref": {"x": 1}}, "invalid_request"),
    ({"type": "publish", "room": "r", "text": "hi", "ref": "e7", "x": 1}, "invalid_request"),
    ({"type": "publish", "text": "hi", "ref": "e8"}, "invalid_request"),
    ({"type": "publish", "room": "r", "text": "hi", "ref": "e9", "key": ""}, "invalid_request"),
    ({"type": "publish", "room": "r", "text": "hi", "ref": "e10", "key": 5}, "invalid_request"),
    (
        {"type": "publish", "room": "r", "text": "hi", "ref": "e11", "key": "k" * 129},
        "invalid_request",
    ),
    (
        {"type": "publish", "room": "r", "text": "hi", "ref": "e12", "key": "a\x00"},
        "invalid_request",
    ),
]


async def test_bad_ws_frames_get_error_frames_and_the_socket_stays(env):
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        async with WSClient.connect(gw.ws_url) as ws:
            for frame, code in WS_CASES:
                await ws.conn.send(
                    frame if isinstance(frame, str) else orjson.dumps(frame).decode()
                )
                err = await ws.expect("error")
                assert err["code"] == code, (frame, err)
                assert err["message"], frame
                ref = frame.get("ref") if isinstance(frame, dict) else None
                if isinstance(ref, str):
                    assert err["ref"] == ref, (frame, err)
                else:
                    assert "ref" not in err, (frame, err)
            await ws.conn.send(b"\x00binary")
            err = await ws.expect("error")
            assert err["code"] == "invalid_request" and "binary" in err["message"]
            await ws.send({"type": "ping"})
            assert await ws.expect("pong") == {"type": "pong"}
            assert [f["type"] for f in ws.frames].count("error") == len(WS_CASES) + 1
            assert (await ws.subscribe("r"))["seq"] == 0

            # a frame past WS_MAX_SIZE closes the socket with 1009
            await ws.conn.send(
                orjson.dumps(
                    {"type": "publish", "room": "r", "text": "a" * 9000, "ref": "big"}
                ).decode()
            )
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.expect("ack", timeout=5)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009

        assert (await http.get(gw.url + MSG)).json()["messages"] == []
        async with WSClient.connect(gw.ws_url) as ws:
            await ws.send({"type": "publish", "room": "r", "text": "ok", "ref": 1})
            ack = await ws.expect("ack")
            assert ack["ref"] == 1 and ack["message"]["seq"] == 1


async def test_read_and_change_routes_list_every_method_and_check_what_they_ignore(gateway_env):
    """One route per path: a 405 names every method of the path in ``Allow``. In auth
    mode a read position's ``user`` and a change's ``author`` are not used, yet they
    are checked against their declared shape, and so is a server API ``reason``."""
    secret, key = "validation-secret-" + "0" * 32, "validation-api-key"
    env = {**gateway_env, "AUTH_SECRET": secret, "API_KEYS": key}
    user = {
        "Authorization": "Bearer "
        + jwt.encode({"sub": "ana", "exp": int(time.time()) + 600}, secret, algorithm="HS256")
    }
    backend = {"Authorization": f"Bearer {key}"}
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        for path, allowed in (
            ("/v1/rooms/r/read", {"GET", "POST"}),
            ("/v1/rooms/r/messages/1", {"PATCH", "DELETE"}),
        ):
            r = await http.put(gw.url + path, json={}, headers=user)
            assert_error(r, 405, "method_not_allowed", path)
            assert allowed <= {m.strip() for m in r.headers["allow"].split(",")}, r.headers
        r = await http.post(gw.url + MSG, json={"text": "hi"}, headers=user)
        assert r.status_code == 201, r.text
        for method, path, kwargs in (
            ("POST", "/v1/rooms/r/read", {"json": {"seq": 1, "user": None}}),
            ("POST", "/v1/rooms/r/read", {"json": {"seq": 1, "user": " "}}),
            ("GET", "/v1/rooms/r/read", {"params": {"user": "a\x00"}}),
            ("GET", "/v1/read", {"params": {"user": "u" * 65}}),
        ):
            r = await http.request(method, gw.url + path, headers=user, **kwargs)
            assert_error(r, 422, "invalid_request", (method, path, kwargs))
            assert r.json()["error"]["field"] == "user", r.text
        for headers in (user, backend):
            r = await http.patch(
                gw.url + MSG + "/1", json={"text": "x", "author": ""}, headers=headers
            )
            assert_error(r, 422, "invalid_request", headers)
            r = await http.request(
                "DELETE", gw.url + MSG + "/1", json={"author": None}, headers=headers
            )
            assert_error(r, 422, "invalid_request", headers)
        r = await http.post(
            gw.url + "/v1/server/disconnect", json={"user": "ana", "reason": None}, headers=backend
        )
        assert_error(r, 422, "invalid_request")
        # nothing changed; a seq with a zero fraction is that integer
        r = await http.get(gw.url + MSG, headers=user)
        assert [(m["text"], m.get("version")) for m in r.json()["messages"]] == [("hi", None)]
        r = await http.post(gw.url + "/v1/rooms/r/read", json={"seq": 1.0}, headers=user)
        assert r.status_code == 200 and r.json() == {
            "room": "r",
            "seq": 1,
            "unread": 0,
            "mentions": 0,
        }, r.text
        spec = (await http.get(gw.url + "/openapi.json")).json()
        assert spec["components"]["schemas"]["MarkRead"]["required"] == ["seq"]


async def test_the_open_mode_document_requires_whose_read_position(gateway_env):
    async with instances(1, gateway_env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        spec = (await http.get(gw.url + "/openapi.json")).json()
        assert spec["components"]["schemas"]["MarkRead"]["required"] == ["seq", "user"]
        for path in ("/v1/read", "/v1/rooms/{room}/read"):
            users = [p for p in spec["paths"][path]["get"]["parameters"] if p["name"] == "user"]
            assert users and users[0]["required"] is True, path
        r = await http.get(gw.url + "/v1/read")
        assert_error(r, 422, "invalid_request")
        r = await http.get(gw.url + "/v1/read", params={"user": "bo"})
        assert r.status_code == 200 and r.json() == {"rooms": []}, r.text


def nested(depth: int) -> dict:
    data: dict = {}
    inner = data
    for _ in range(depth - 1):
        inner["a"] = {}
        inner = inner["a"]
    return data


@pytest.mark.parametrize(
    ("path", "target"),
    [("/v1/publish", b'"room":"r"'), ("/v1/server/broadcast", b'"rooms":["r","s"]')],
)
async def test_event_data_nested_too_deep_is_a_422(tmp_path, path, target):
    """``POST /v1/publish`` and ``POST /v1/server/broadcast`` check ``data`` alike."""
    headers = {"Content-Type": "application/json", "Authorization": "Bearer k"}
    async with (
        instances(1, embedded_env(tmp_path, API_KEYS="k")) as (gw,),
        httpx.AsyncClient(headers=headers) as http,
    ):
        for depth in (33, 254, 300):
            body = (
                b"{"
                + target
                + b',"event":"e","data":'
                + b'{"a":' * (depth - 1)
                + b"{}"
                + b"}" * (depth - 1)
                + b"}"
            )
            r = await http.post(f"{gw.url}{path}", content=body)
            assert r.status_code == 422, (depth, r.text)
            error = r.json()["error"]
            assert (error["code"], error["field"], error["limit"]) == (
                "invalid_request",
                "data",
                32,
            )
            assert error["message"] == "data nests deeper than 32 levels"
        body = orjson.loads(b"{" + target + b',"event":"e"}')
        r = await http.post(f"{gw.url}{path}", json={**body, "data": nested(32)})
        assert r.status_code == 202, r.text
        no_errors(gw.log())


async def test_since_in_a_frame_must_be_a_number(tmp_path):
    async with (
        instances(1, embedded_env(tmp_path)) as (gw,),
        WSClient.connect(gw.ws_url) as ws,
        httpx.AsyncClient() as http,
    ):
        for i in range(3):
            await post(http, gw.url, "r", f"m{i}")
        for bad in ("5", "0", True, -1, 1.5):
            await ws.send({"type": "subscribe", "room": "r", "since": bad})
            err = await ws.expect("error")
            assert err["code"] == "invalid_request" and err["field"] == "since", (bad, err)
        assert (await ws.subscribe("r", since=1))["seq"] == 3
        assert await ws.messages("r", 2) == [2, 3]


async def test_the_user_parameter_is_checked_in_auth_mode_too(tmp_path):
    async with (
        instances(1, embedded_env(tmp_path, AUTH_SECRET=SECRET)) as (gw,),
        httpx.AsyncClient() as http,
    ):
        headers = {"Authorization": f"Bearer {token()}"}
        r = await http.get(f"{gw.url}/v1/rooms/r/events", params={"user": ""}, headers=headers)
        assert r.status_code == 422 and r.json()["error"]["field"] == "author", r.text
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with WSClient.connect(f"{gw.ws_url}?token={token()}&user=%20"):
                pass
        assert refused.value.response.status_code == 422


async def test_ws_over_plain_http_checks_its_query_before_asking_for_an_upgrade(tmp_path):
    async with instances(1, embedded_env(tmp_path)) as (gw,), httpx.AsyncClient() as http:
        for query in ("?user=" + "a" * 500, "?nope=1"):
            r = await http.get(gw.url + "/v1/ws" + query)
            assert r.status_code == 422, (query, r.status_code)
            assert r.json()["error"]["code"] == "invalid_request"
        r = await http.get(gw.url + "/v1/ws?user=ana")
        assert r.status_code == 426
