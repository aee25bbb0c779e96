"""Small holes a hostile client found, each closed: what it sent, and what it gets now."""

from __future__ import annotations

import asyncio
import socket

import orjson

from tests.harness import instances, t


def embedded(tmp_path, **extra: str) -> dict[str, str]:
    return {"DATABASE_URL": f"sqlite:///{tmp_path}/x.db", "REDIS_URL": "memory://",
            "LOG_LEVEL": "info", "RATE_LIMIT": "100000/1s", "CONNECT_RATE_LIMIT": "100000/1s",
            **extra}


def log_lines(text: str) -> list[dict]:
    return [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]


def no_errors(text: str) -> None:
    bad = [line for line in log_lines(text) if line["level"] in ("error", "critical")]
    assert not bad, bad


async def test_a_client_aborting_its_post_body_is_no_error(tmp_path):
    async with instances(1, embedded(tmp_path)) as (gw,):
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", gw.port), timeout=t(10)) as s:
                s.sendall(b"POST /v1/rooms/r/messages HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n"
                          b'{"text": "half')
                await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
        assert "POST /v1/rooms/r/messages" in gw.log()
        no_errors(gw.log())
