"""What a hostile or broken HTTP peer may send or hold on a real gateway process: slow
or endless request heads, slow bodies, bodies cut off, heads too large, requests
that are not HTTP, and SSE readers that never read. Each is answered with the JSON
error body where an answer can still be given, and its connection is closed, not
kept; pages carry their security headers and a trailing slash never redirects."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.harness import (
    Instance,
    embedded_env,
    eventually,
    instances,
    no_errors,
    t,
)

OPEN: list[socket.socket] = []


def raw(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=t(10))
    OPEN.append(sock)
    return sock


@pytest.fixture(autouse=True)
def close_sockets() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


def response(sock: socket.socket, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Read until the server closes the connection; the status, headers and body."""
    sock.settimeout(t(timeout))
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def assert_error(status: int, headers: dict[str, str], body: bytes, want: int, code: str) -> None:
    assert status == want, (status, body)
    assert headers["content-type"] == "application/json"
    assert orjson.loads(body)["error"]["code"] == code, body


def established(port: int, peers: list[socket.socket]) -> int:
    """How many of ``peers``' connections the server's side still holds ESTABLISHED."""
    out = subprocess.run(
        ["ss", "-tnH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    ports = {f":{p.getsockname()[1]}" for p in peers}
    return len(
        [
            line
            for line in out.splitlines()
            if line.split() and any(line.split()[-1].endswith(p) for p in ports)
        ]
    )


async def test_slow_heads_and_bodies_are_cut_off_with_408(tmp_path):
    env = embedded_env(tmp_path, HTTP_HEADER_TIMEOUT="1", HTTP_BODY_TIMEOUT="1")
    async with instances(1, env) as (gw,):
        # slowloris: a head trickling in never completes, and a silent peer too
        loris, silent = raw(gw.port), raw(gw.port)
        loris.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for i in range(3):
            await asyncio.sleep(0.4)
            try:
                loris.sendall(b"X-Slow-%d: 1\r\n" % i)
            except OSError:
                break
        assert_error(*response(loris), 408, "request_timeout")
        assert_error(*response(silent), 408, "request_timeout")
        # a body promised and not sent
        slow = raw(gw.port)
        slow.sendall(
            b"POST /v1/rooms/r/messages HTTP/1.1\r\nHost: x\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"te'
        )
        assert_error(*response(slow), 408, "request_timeout")
        # an honest client on a kept-alive connection is not affected
        async with httpx.AsyncClient(base_url=gw.url) as http:
            assert (await http.get("/healthz")).status_code == 200
            await asyncio.sleep(0.5)
            r = await http.post("/v1/rooms/r/messages", json={"text": "hi"})
            assert r.status_code == 201, r.text
        page = httpx.get(f"{gw.url}/v1/rooms/r/messages").json()
        assert [m["text"] for m in page["messages"]] == ["hi"], "the cut-off post stored nothing"
        for line in gw.log().splitlines():
            assert '"level":"error"' not in line, line


async def test_heads_past_the_limit_get_431_and_bad_requests_a_json_400(tmp_path):
    env = embedded_env(tmp_path, HTTP_MAX_HEADER_BYTES="8192")
    async with instances(1, env) as (gw,):
        # one head of 20 KiB in one piece
        big = raw(gw.port)
        big.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
        assert_error(*response(big), 431, "headers_too_large")
        # an endless head: refused once past the limit, not buffered on
        endless = raw(gw.port)
        endless.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        sent = 0
        try:
            for _ in range(2000):  # up to 8 MiB
                endless.sendall(b"b" * 4096)
                sent += 4096
        except OSError:
            pass
        assert sent < 2000 * 4096, "the server kept reading an endless head"
        status, headers, body = response(endless)
        assert status in (431, 0) or body == b""  # the answer may be lost in the reset
        # a head just under the limit is served
        r = httpx.get(f"{gw.url}/healthz", headers={"X-Fine": "c" * 7000})
        assert r.status_code == 200
        # not HTTP at all: the JSON error body, not text/plain
        junk = raw(gw.port)
        junk.sendall(b"\x16\x03\x01 this is not HTTP\r\n\r\n")
        assert_error(*response(junk), 400, "invalid_request")
        for line in gw.log().splitlines():
            assert '"level":"error"' not in line, line


async def test_sse_readers_that_never_read_lose_their_sockets(tmp_path):
    env = embedded_env(tmp_path, SSE_SEND_TIMEOUT="1", QUEUE_MAX_BYTES="262144")
    inst = Instance(env).start()
    readers: list[socket.socket] = []
    try:
        await inst.wait_ready()
        for _ in range(5):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            OPEN.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", inst.port))
            s.sendall(b"GET /v1/rooms/flood/events HTTP/1.1\r\nHost: x\r\n\r\n")
            readers.append(s)
        async with httpx.AsyncClient(base_url=inst.url, timeout=t(10)) as http:
            data = {"blob": "x" * 60000}
            await eventually(lambda: established(inst.port, readers) == 5)
            deadline = time.monotonic() + t(30)
            # the readers' kernel buffers fill, then the server's (some MiB each); past
            # SSE_SEND_TIMEOUT with nothing taken, the server lets the connections go
            while held := established(inst.port, readers):
                assert time.monotonic() < deadline, f"{held} of 5 still held"
                for _ in range(10):
                    r = await http.post(
                        "/v1/publish", json={"room": "flood", "event": "big", "data": data}
                    )
                    assert r.status_code == 202, r.text
            await http.get("/healthz")  # the instance still serves
        for s in readers:  # and the readers see the reset once they look
            s.settimeout(t(10))
            try:
                while s.recv(1 << 20):
                    pass
            except ConnectionResetError:
                pass
        assert '"level":"error"' not in inst.log(), inst.log()
    finally:
        inst.stop()


async def test_a_client_aborting_its_post_body_is_no_error(tmp_path):
    async with instances(1, embedded_env(tmp_path)) as (gw,):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", gw.port), timeout=t(10)) as s:
                s.sendall(
                    b"POST /v1/rooms/r/messages HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                    b'{"text": "half'
                )
                await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
        assert "POST /v1/rooms/r/messages" in gw.log()
        no_errors(gw.log())


async def test_pages_send_security_headers_and_slashes_never_redirect(tmp_path):
    async with instances(1, embedded_env(tmp_path)) as (gw,), httpx.AsyncClient() as http:
        for path in ("/", "/dashboard"):
            r = await http.get(gw.url + path)
            assert r.status_code == 200
            csp = r.headers["content-security-policy"]
            assert "frame-ancestors 'none'" in csp and "script-src 'self'" in csp
            assert r.headers["x-content-type-options"] == "nosniff"
            assert r.headers["referrer-policy"] == "no-referrer"
            assert r.headers["x-frame-options"] == "DENY"
        for path in ("/healthz/", "/v1/rooms/r/messages/", "/dashboard/"):
            r = await http.get(gw.url + path, headers={"Host": "evil.example"})
            assert r.status_code == 404, (path, r.status_code)
            assert "location" not in r.headers
            assert r.json()["error"]["code"] == "not_found"


async def test_every_static_file_and_the_sdk_refuse_framing_and_sniffing(tmp_path):
    async with instances(1, embedded_env(tmp_path)) as (gw,), httpx.AsyncClient() as http:
        for path in (
            "/static/index.html",
            "/static/dashboard.html",
            "/static/chat.js",
            "/sdk/chat-gateway.js",
        ):
            r = await http.get(gw.url + path)
            assert r.status_code == 200, path
            csp = r.headers.get("content-security-policy", "")
            assert "frame-ancestors 'none'" in csp, path
            assert r.headers.get("x-frame-options") == "DENY", path
            assert r.headers.get("x-content-type-options") == "nosniff", path
            assert r.headers.get("referrer-policy") == "no-referrer", path
