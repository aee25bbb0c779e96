"""Webhooks from the transactional outbox, against real receivers and real gateways.

Each receiver is a small HTTP/1.1 server in the test on a free loopback port;
it verifies every request with the ``standardwebhooks`` package and answers as
the test tells it: fail, stall, 429 with Retry-After, 410, or be down.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
import pytest
from standardwebhooks.webhooks import Webhook

from chat_gateway.config import Backoff, ConfigError, Settings
from tests.harness import Instance, eventually, free_port, metric, post, t

ADMIN_KEY = "admin-key-for-tests"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def new_secret() -> str:
    return "whsec_" + base64.b64encode(os.urandom(32)).decode()


@dataclass
class Hit:
    """One request a receiver got."""

    headers: dict[str, str]
    body: bytes
    payload: dict[str, Any]
    at: float
    status: int = 0


Answer = tuple[int, dict[str, str], float]  # status, headers, seconds to stall first


@dataclass
class Receiver:
    """A webhook receiver on a loopback port; ``answer`` decides each reply."""

    secrets: list[str]
    port: int = field(default_factory=free_port)
    answer: Callable[[Hit], Answer] = lambda hit: (200, {}, 0.0)
    reply: Callable[[Hit], bytes] = lambda hit: b""  # the body of each answer
    hits: list[Hit] = field(default_factory=list)
    unverified: list[str] = field(default_factory=list)
    in_flight: set[str] = field(default_factory=set)
    overlaps: list[str] = field(default_factory=list)  # an event sent while already in flight
    _server: asyncio.Server | None = None
    _conns: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks"

    async def start(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        """Down: the port refuses connections, open ones are cut."""
        if self._server is not None:
            self._server.close()
            for writer in list(self._conns):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    def delivered(self) -> list[Hit]:
        return [h for h in self.hits if 200 <= h.status < 300]

    def seqs(self, room: str) -> list[int]:
        return [
            h.payload["data"]["seq"] for h in self.delivered() if h.payload["data"]["room"] == room
        ]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                hit = Hit(headers, body, orjson.loads(body), time.monotonic())
                self.hits.append(hit)
                for secret in self.secrets:
                    try:
                        Webhook(secret).verify(body, headers)
                    except Exception as exc:
                        self.unverified.append(f"{headers.get('webhook-id')}: {exc!r}")
                event = headers.get("webhook-id", "")
                if event in self.in_flight:
                    self.overlaps.append(event)
                self.in_flight.add(event)
                try:
                    status, extra, stall = self.answer(hit)
                    if stall:
                        await asyncio.sleep(stall)
                finally:
                    self.in_flight.discard(event)
                hit.status = status
                extra_lines = "".join(f"{k}: {v}\r\n" for k, v in extra.items())
                content = self.reply(hit)
                writer.write(
                    f"HTTP/1.1 {status} X\r\ncontent-length: {len(content)}\r\n"
                    f"{extra_lines}\r\n".encode()
                    + content
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()


def hook_env(base: dict[str, str], receiver: Receiver, **extra: str) -> dict[str, str]:
    return {
        **base,
        "WEBHOOK_URLS": receiver.url,
        "WEBHOOK_SECRET": " ".join(receiver.secrets),
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_BACKOFF": "0.05,0.2",
        "WEBHOOK_POLL_INTERVAL": "0.1",
        "WEBHOOK_TIMEOUT": "2",
        "API_KEYS": ADMIN_KEY,
        **extra,
    }


@pytest.fixture(params=["postgres", "sqlite"])
def any_env(request, tmp_path) -> dict[str, str]:
    """A gateway environment on Postgres (with Redis), or on SQLite alone."""
    if request.param == "postgres":
        return request.getfixturevalue("gateway_env")  # type: ignore[no-any-return]
    return {
        "DATABASE_URL": f"sqlite:///{tmp_path}/hooks.db",
        "REDIS_URL": "memory://",
        "RATE_LIMIT": "100000/1s",
        "LOG_LEVEL": "warning",
    }


async def post_all(base: str, posts: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Post ``(room, text)`` pairs, several at once; the stored messages."""
    async with httpx.AsyncClient(timeout=t(20)) as client:
        sem = asyncio.Semaphore(8)

        async def one(room: str, text: str) -> dict[str, Any]:
            async with sem:
                r = await post(client, base, room, text)
                assert r.status_code == 201, r.text
                return r.json()  # type: ignore[no-any-return]

        return list(await asyncio.gather(*(one(room, text) for room, text in posts)))


def check_delivered(receiver: Receiver, messages: list[dict[str, Any]]) -> None:
    """Every message arrived, signed, with its event id and body, in seq order per room."""
    assert receiver.unverified == []
    by_id = {h.headers["webhook-id"]: h for h in receiver.delivered()}
    for msg in messages:
        hit = by_id[f"evt_{msg['id']}"]
        assert hit.payload == {
            "type": "message.created",
            "timestamp": msg["created_at"],
            "data": msg,
        }
    for room in {m["room"] for m in messages}:
        seqs = receiver.seqs(room)
        assert seqs == sorted(seqs), f"room {room} out of order: {seqs}"
        assert set(seqs) == {m["seq"] for m in messages if m["room"] == room}


# -- delivery ------------------------------------------------------------------------


async def test_every_message_arrives_signed_in_room_order(any_env):
    env = any_env
    receiver = await Receiver([new_secret(), new_secret()]).start()  # a rotation: two secrets
    gw = Instance(hook_env(env, receiver)).start()
    try:
        await gw.wait_ready()
        msgs = await post_all(gw.url, [(f"room{i % 3}", f"m{i}") for i in range(30)])
        await eventually(lambda: len(receiver.delivered()) >= 30, 20)
        check_delivered(receiver, msgs)
        assert len(receiver.hits) == 30  # nothing sent twice on the way
        assert await metric(gw.url, "chat_webhook_attempts_total", outcome="success") == 30
    finally:
        gw.stop()
        await receiver.stop()


async def test_edits_and_deletes_are_sent_in_commit_order_with_messages(any_env):
    """Posts, edits and a delete of one room, written while the receiver refuses
    everything, so they queue: once it answers, it gets message.created,
    message.updated and message.deleted signed, each change's data the message as
    after it plus its change number, in commit order (a change after the messages
    committed before it, not by the seq of the message it changes)."""
    open_ = False
    receiver = await Receiver(
        [new_secret()], answer=lambda hit: (200, {}, 0.0) if open_ else (500, {}, 0.0)
    ).start()
    gw = Instance(hook_env(any_env, receiver, WEBHOOK_BREAKER_FAILURES="100000")).start()
    room = "edits"
    try:
        await gw.wait_ready()
        async with httpx.AsyncClient(timeout=t(20)) as http:
            url = f"{gw.url}/v1/rooms/{room}/messages"
            sent: list[tuple[str, dict[str, Any]]] = []  # (type, data) in commit order

            async def write(method: str, seq: int | None, text: str | None) -> None:
                if method == "POST":
                    r = await post(http, gw.url, room, text or "", author="ana")
                    assert r.status_code == 201, r.text
                    sent.append(("message.created", r.json()))
                    return
                body = {"author": "ana"} if text is None else {"text": text, "author": "ana"}
                r = await http.request(method, f"{url}/{seq}", json=body)
                assert r.status_code == 200, r.text
                change = 1 + sum(1 for kind, _ in sent if kind != "message.created")
                sent.append(
                    (
                        "message.deleted" if text is None else "message.updated",
                        {**r.json(), "change": change},
                    )
                )

            await write("POST", None, "m1")
            await write("POST", None, "m2")
            await write("PATCH", 1, "m1 v2")
            await write("POST", None, "m3")
            await write("DELETE", 1, None)
            await write("PATCH", 2, "m2 v2")
            await write("PATCH", 3, "m3 v2")
            await write("DELETE", 1, None)  # a repeated delete changes nothing: no event
            assert len(sent) == 8
            sent.pop()
            # The delete scrubbed the text from message 1's earlier events, which were
            # still queued: they go out with it empty and the delete's deleted_at.
            deleted_at = sent[4][1]["deleted_at"]
            for i in (0, 2):
                sent[i] = (sent[i][0], {**sent[i][1], "text": "", "deleted_at": deleted_at})
        await eventually(lambda: len(receiver.hits) >= 1, 20)  # refused, so queued
        open_ = True
        await eventually(lambda: len(receiver.delivered()) >= len(sent), 20)
        await asyncio.sleep(0.5)  # nothing more may come
        assert receiver.unverified == []
        got = [(h.payload["type"], h.payload["data"]) for h in receiver.delivered()]
        assert got == sent
        deleted = sent[4][1]
        assert deleted["seq"] == 1 and deleted["text"] == "" and deleted["deleted_at"]
        for hit, (kind, data) in zip(receiver.delivered(), sent, strict=True):
            if kind == "message.created":
                assert hit.headers["webhook-id"] == f"evt_{data['id']}"
                assert hit.payload["timestamp"] == data["created_at"]
            else:
                assert hit.payload["timestamp"] == (
                    data["edited_at"] if kind == "message.updated" else data["deleted_at"]
                )
        ids = [h.headers["webhook-id"] for h in receiver.delivered()]
        assert len(set(ids)) == len(ids)
    finally:
        gw.stop()
        await receiver.stop()


async def test_failures_are_retried_with_the_same_id_and_order_holds(gateway_env):
    """Each event fails twice (500, then a stall past the timeout) before it succeeds:
    the id stays, and no later event of the room goes out before an earlier one."""
    tries: dict[str, int] = {}

    def flaky(hit: Hit) -> Answer:
        n = tries[hit.headers["webhook-id"]] = tries.get(hit.headers["webhook-id"], 0) + 1
        return [(500, {}, 0.0), (200, {}, 1.5), (200, {}, 0.0)][min(n, 3) - 1]

    receiver = await Receiver([new_secret()], answer=flaky).start()
    gw = Instance(hook_env(gateway_env, receiver, WEBHOOK_TIMEOUT="0.5")).start()
    try:
        await gw.wait_ready()
        msgs = await post_all(gw.url, [("flaky", f"m{i}") for i in range(5)])
        # Every event tried three times: a stalled attempt counts as delivered by the
        # receiver, so the count of deliveries alone can be reached before the last.
        await eventually(lambda: len(tries) >= 5 and all(v >= 3 for v in tries.values()), 30)
        check_delivered(receiver, msgs)
        assert set(tries.values()) == {3}
        # Every attempt of seq n comes before any attempt of seq n + 1.
        attempted = [h.payload["data"]["seq"] for h in receiver.hits]
        assert attempted == sorted(attempted)
        assert await metric(gw.url, "chat_webhook_attempts_total", outcome="timeout") == 5
        assert await metric(gw.url, "chat_webhook_attempts_total", outcome="http_error") == 5
    finally:
        gw.stop()
        await receiver.stop()


async def test_retry_after_is_honoured_on_429(gateway_env):
    answers = iter([(429, {"Retry-After": "2"}, 0.0)])
    receiver = await Receiver(
        [new_secret()], answer=lambda hit: next(answers, (200, {}, 0.0))
    ).start()
    gw = Instance(hook_env(gateway_env, receiver)).start()
    try:
        await gw.wait_ready()
        await post_all(gw.url, [("busy", "one")])
        await eventually(lambda: len(receiver.delivered()) == 1, 20)
        first, second = receiver.hits
        # The backoff alone would have retried within 0.2 s.
        assert second.at - first.at >= 1.9
        assert await metric(gw.url, "chat_webhook_attempts_total", outcome="rate_limited") == 1
    finally:
        gw.stop()
        await receiver.stop()


async def test_gone_disables_the_receiver_until_an_operator_enables_it(gateway_env):
    gone = True
    receiver = await Receiver(
        [new_secret()], answer=lambda hit: (410 if gone else 200, {}, 0.0)
    ).start()
    gw = Instance(hook_env(gateway_env, receiver)).start()
    try:
        await gw.wait_ready()
        msgs = await post_all(gw.url, [("gone", f"m{i}") for i in range(3)])
        async with httpx.AsyncClient(base_url=gw.url, headers=AUTH) as client:

            async def listed() -> dict[str, Any]:
                return (await client.get("/v1/admin/webhooks")).json()["endpoints"][0]

            endpoint = await eventually(lambda: _when(listed(), state="disabled", backlog=3))
            assert endpoint["url"] == receiver.url and "410" in endpoint["disabled_reason"]
            await asyncio.sleep(t(1))
            assert len(receiver.hits) == 1  # nothing more goes to a receiver that is gone
            gone = False
            r = await client.post("/v1/admin/webhooks/enable", json={"url": receiver.url})
            assert r.status_code == 200 and r.json()["state"] == "closed"
            await eventually(lambda: len(receiver.delivered()) == 3, 20)
            check_delivered(receiver, msgs)
            await eventually(lambda: _when(listed(), state="closed", backlog=0))
    finally:
        gw.stop()
        await receiver.stop()


async def _when(listing: Any, **want: Any) -> Any:
    got = await listing
    if isinstance(got, httpx.Response):
        got = got.json()["endpoints"][0]
    return got if all(got.get(k) == v for k, v in want.items()) else None


async def test_dead_letters_are_listed_paged_and_replayed(any_env):
    failing = True
    receiver = await Receiver(
        [new_secret()], answer=lambda hit: (500 if failing else 204, {}, 0.0)
    ).start()
    gw = Instance(hook_env(any_env, receiver, WEBHOOK_MAX_ATTEMPTS="2")).start()
    try:
        await gw.wait_ready()
        msgs = sorted(
            await post_all(gw.url, [("dl", "first"), ("dl", "second")]), key=lambda m: m["seq"]
        )
        async with httpx.AsyncClient(base_url=gw.url, headers=AUTH) as client:

            async def dead() -> list[dict[str, Any]]:
                return (await client.get("/v1/admin/webhooks/dead")).json()["dead"]

            letters = await eventually(lambda: _count(dead(), 2), 20)
            assert [d["seq"] for d in letters] == [2, 1]  # newest first
            for d, msg in zip(letters, reversed(msgs), strict=True):
                assert d["event_id"] == f"evt_{msg['id']}" and d["attempts"] == 2
                assert d["last_status"] == 500 and d["endpoint"] == receiver.url
                assert d["payload"]["data"] == msg
            assert len(receiver.hits) == 4
            assert await metric(gw.url, "chat_webhook_dead_letters_total") == 2
            page = (await client.get("/v1/admin/webhooks/dead", params={"limit": 1})).json()
            assert [d["seq"] for d in page["dead"]] == [2] and page["next"] is not None
            rest = (
                await client.get(
                    "/v1/admin/webhooks/dead", params={"limit": 1, "before": page["next"]}
                )
            ).json()
            assert [d["seq"] for d in rest["dead"]] == [1] and rest["next"] is None

            failing = False
            r = await client.post(
                "/v1/admin/webhooks/replay", json={"ids": [d["id"] for d in letters]}
            )
            assert r.status_code == 202 and r.json()["replayed"] == 2
            await eventually(lambda: len(receiver.delivered()) == 2, 20)
            check_delivered(receiver, msgs)
            assert await dead() == []
            await eventually(lambda: _when(client.get("/v1/admin/webhooks"), backlog=0))

            # A time range sends every event committed in it again, delivered ones too.
            r = await client.post(
                "/v1/admin/webhooks/replay", json={"from": "2000-01-01T00:00:00Z"}
            )
            assert r.status_code == 202 and r.json()["replayed"] == 2
            await eventually(lambda: len(receiver.delivered()) == 4, 20)
            assert [h.payload["data"]["seq"] for h in receiver.delivered()] == [1, 2, 1, 2]
            assert receiver.unverified == []
    finally:
        gw.stop()
        await receiver.stop()


async def _count(listing: Any, n: int) -> Any:
    got = await listing
    return got if len(got) == n else None


async def test_the_breaker_bounds_attempts_to_a_dead_receiver(gateway_env):
    failing = True
    receiver = await Receiver(
        [new_secret()], answer=lambda hit: (500 if failing else 200, {}, 0.0)
    ).start()
    gw = Instance(
        hook_env(
            gateway_env,
            receiver,
            WEBHOOK_BACKOFF="0.01,0.02",
            WEBHOOK_BREAKER_FAILURES="3",
            WEBHOOK_BREAKER_COOLDOWN="1",
            WEBHOOK_CONCURRENCY="2",
            WEBHOOK_MAX_ATTEMPTS="100000",
        )
    ).start()
    try:
        await gw.wait_ready()
        msgs = await post_all(gw.url, [(f"b{i}", "x") for i in range(10)])
        await eventually(lambda: receiver.hits, 10)
        start = receiver.hits[0].at
        await asyncio.sleep(4)
        window = time.monotonic() - start
        hits = len(receiver.hits)
        # Without the breaker ten queues retried every 10-20 ms: hundreds of attempts.
        # With it: the failures that open it, what was in flight, one probe a second.
        assert hits <= 3 + 2 + int(window) + 1, hits
        async with httpx.AsyncClient(base_url=gw.url, headers=AUTH) as client:
            state = (await client.get("/v1/admin/webhooks")).json()["endpoints"][0]
            assert state["state"] in ("open", "half_open") and state["backlog"] == 10
            assert await metric(gw.url, "chat_webhook_breaker_state") in (1, 2)
            failing = False  # it recovers: the backlog drains, in order
            await eventually(lambda: len(receiver.delivered()) == 10, 20)
            check_delivered(receiver, msgs)

            async def drained() -> bool:
                # The last event leaves the backlog once its 2xx is back and recorded,
                # a moment after the receiver has counted it.
                state = (await client.get("/v1/admin/webhooks")).json()["endpoints"][0]
                return state["state"] == "closed" and state["backlog"] == 0

            await eventually(drained, 10)
    finally:
        gw.stop()
        await receiver.stop()


async def test_a_commit_is_delivered_after_its_instance_is_killed(gateway_env):
    """The receiver holds every request; the instance that committed the messages is
    SIGKILLed with one attempt in flight and the rest never tried. Another instance,
    started later, delivers them all, in order, once the dead one's lease is over."""
    holding = True
    receiver = await Receiver(
        [new_secret()], answer=lambda hit: (200, {}, 60.0 if holding else 0.0)
    ).start()
    env = hook_env(gateway_env, receiver, WEBHOOK_TIMEOUT="1")
    first = Instance(env).start()
    second = Instance(env)
    try:
        await first.wait_ready()
        msgs = await post_all(first.url, [("crash", f"m{i}") for i in range(5)])
        await eventually(lambda: receiver.hits, 10)
        first.kill()
        await receiver.stop()  # and the receiver is down for a while
        await asyncio.sleep(1)
        holding = False
        await receiver.start()
        second.start()
        await second.wait_ready()
        await eventually(lambda: len(receiver.delivered()) == 5, 30)
        check_delivered(receiver, msgs)
    finally:
        first.stop()
        second.stop()
        await receiver.stop()


async def test_a_killed_instance_holds_its_queue_for_seconds_not_for_its_attempt_timeout(
    gateway_env,
):
    """The receiver holds the first request; the instance sending it is SIGKILLed
    mid-attempt. Another instance, already running, takes the queue over once the
    dead one stops renewing its lease (a few seconds), not after a lease sized for
    the attempt (2 x WEBHOOK_TIMEOUT + 5 = 25 s here), and the room's events follow
    in order. (At least once: the held event is sent again.)"""
    first_hit = True

    def answer(hit: Hit) -> Answer:
        nonlocal first_hit
        stall, first_hit = (30.0 if first_hit else 0.0), False
        return 200, {}, stall

    receiver = await Receiver([new_secret()], answer=answer).start()
    env = hook_env(gateway_env, receiver, WEBHOOK_TIMEOUT="10")
    first = Instance(env).start()
    second = Instance(env)
    try:
        await first.wait_ready()
        msgs = await post_all(first.url, [("crash", f"m{i}") for i in range(3)])
        await eventually(lambda: receiver.hits, 10)  # seq 1's attempt, held
        second.start()
        await second.wait_ready()
        await asyncio.sleep(t(1.5))  # renewed meanwhile: nobody else sent it
        assert len(receiver.hits) == 1, [h.payload["data"]["seq"] for h in receiver.hits]
        first.kill()
        killed = time.monotonic()
        await eventually(lambda: receiver.seqs("crash")[:1] == [1], 30)
        took = time.monotonic() - killed
        assert took < 10, f"the dead instance's queue waited {took:.1f} s"
        await eventually(lambda: len(receiver.delivered()) == 3, 30)
        check_delivered(receiver, msgs)
        assert receiver.seqs("crash") == [1, 2, 3]
    finally:
        first.stop()
        second.stop()
        await receiver.stop()


async def test_two_instances_share_the_outbox_without_sending_an_event_twice(gateway_env):
    receiver = await Receiver([new_secret()], answer=lambda hit: (200, {}, 0.02)).start()
    # Two attempts in flight per instance and twelve rooms: more than one can carry.
    env = hook_env(gateway_env, receiver, WEBHOOK_CONCURRENCY="2")
    gws = [Instance(env).start(), Instance(env).start()]
    try:
        await asyncio.gather(*(g.wait_ready() for g in gws))
        posts = [(f"s{i % 12}", f"m{i}") for i in range(60)]
        msgs = sum(
            await asyncio.gather(
                post_all(gws[0].url, posts[::2]), post_all(gws[1].url, posts[1::2])
            ),
            [],
        )
        await eventually(lambda: len(receiver.delivered()) >= 60, 30)
        await asyncio.sleep(0.5)
        check_delivered(receiver, msgs)
        assert receiver.overlaps == []
        assert len(receiver.hits) == 60  # no failure, so no event went out twice
        done = [await metric(g.url, "chat_webhook_attempts_total", outcome="success") for g in gws]
        assert sum(done) == 60 and all(done), done  # both did some of the work
    finally:
        for g in gws:
            g.stop()
        await receiver.stop()


# -- addresses, configuration, operators -----------------------------------------------


def test_the_configuration_refuses_private_receivers_and_bad_values():
    secret = new_secret()
    ok = Settings(webhook_urls=("https://hooks.example.com/in",), webhook_secret=secret)
    assert ok.validated().webhook_backoff.longest <= 3600
    for url in (
        "http://127.0.0.1:9/x",
        "http://[::1]/x",
        "http://10.1.2.3/x",
        "http://169.254.169.254/latest",
        "http://192.168.0.1/",
    ):
        with pytest.raises(ConfigError, match="WEBHOOK_ALLOW_PRIVATE"):
            Settings(webhook_urls=(url,), webhook_secret=secret).validated()
        Settings(webhook_urls=(url,), webhook_secret=secret, webhook_allow_private=True).validated()
    bad = [
        dict(webhook_urls=("https://a.example/",)),
        dict(webhook_urls=("ftp://a.example/",), webhook_secret=secret),
        dict(webhook_urls=("https://a.example/",), webhook_secret="not-a-secret"),
        dict(webhook_urls=("https://a.example/",), webhook_secret="whsec_c2hvcnQ="),
        dict(webhook_urls=("https://a.example/", "https://a.example/"), webhook_secret=secret),
    ]
    for values in bad:
        with pytest.raises(ConfigError):
            Settings(**values).validated()  # type: ignore[arg-type]
    from chat_gateway.webhooks.egress import refused

    for address in (
        "127.0.0.1",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "::1",
        "fe80::1",
        "fc00::1",
        "::ffff:127.0.0.1",
        "224.0.0.1",
    ):
        assert refused(address), address
    for address in ("93.184.215.14", "2606:4700::6810:84e5", "::ffff:8.8.8.8"):
        assert not refused(address), address
    for text in ("5", "10,5", "0,1", "a,b"):
        with pytest.raises(ConfigError, match="WEBHOOK_BACKOFF"):
            Settings.from_env({"WEBHOOK_BACKOFF": text})


async def test_a_name_that_resolves_to_loopback_is_blocked_when_sent(gateway_env):
    receiver = await Receiver([new_secret()]).start()
    env = hook_env(
        gateway_env,
        receiver,
        WEBHOOK_ALLOW_PRIVATE="false",
        WEBHOOK_URLS=f"http://localhost:{receiver.port}/hooks",
    )
    gw = Instance(env).start()
    try:
        await gw.wait_ready()
        await post_all(gw.url, [("ssrf", "x")])
        await eventually(
            lambda: metric(gw.url, "chat_webhook_attempts_total", outcome="blocked"), 10
        )
        assert receiver.hits == []
    finally:
        gw.stop()
        await receiver.stop()


async def test_admin_routes_need_the_api_key_and_refuse_bad_input(tmp_path):
    receiver = await Receiver([new_secret()]).start()
    env = hook_env({"DATABASE_URL": f"sqlite:///{tmp_path}/a.db", "LOG_LEVEL": "warning"}, receiver)
    gw = Instance(env).start()
    try:
        await gw.wait_ready()
        async with httpx.AsyncClient(base_url=gw.url) as client:
            for method, path in (
                ("GET", "/v1/admin/webhooks"),
                ("GET", "/v1/admin/webhooks/dead"),
                ("POST", "/v1/admin/webhooks/replay"),
            ):
                r = await client.request(method, path, json={"ids": [1]})
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            client.headers.update(AUTH)
            listed = (await client.get("/v1/admin/webhooks")).json()["endpoints"]
            assert [
                (e["url"], e["state"], e["backlog"], e["oldest_pending_s"]) for e in listed
            ] == [(receiver.url, "closed", 0, None)]
            refusals = [
                ("POST", "/v1/admin/webhooks/replay", b"nope", 400, "invalid_json"),
                ("POST", "/v1/admin/webhooks/replay", b"{}", 422, "invalid_request"),
                ("POST", "/v1/admin/webhooks/replay", b'{"ids": "1"}', 422, "invalid_request"),
                ("POST", "/v1/admin/webhooks/replay", b'{"ids": [true]}', 422, "invalid_request"),
                (
                    "POST",
                    "/v1/admin/webhooks/replay",
                    b'{"ids": [1], "x": 1}',
                    422,
                    "invalid_request",
                ),
                (
                    "POST",
                    "/v1/admin/webhooks/replay",
                    b'{"from": "yesterday"}',
                    422,
                    "invalid_request",
                ),
                (
                    "POST",
                    "/v1/admin/webhooks/replay",
                    b'{"from": "2026-01-01T00:00:00"}',
                    422,
                    "invalid_request",
                ),
                (
                    "POST",
                    "/v1/admin/webhooks/replay",
                    b'{"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}',
                    422,
                    "invalid_request",
                ),
                (
                    "POST",
                    "/v1/admin/webhooks/replay",
                    b'{"ids": [1], "endpoint": "http://x/"}',
                    404,
                    "not_found",
                ),
                ("GET", "/v1/admin/webhooks/dead?limit=0", b"", 422, "invalid_request"),
                ("GET", "/v1/admin/webhooks/dead?cursor=1", b"", 422, "invalid_request"),
                ("POST", "/v1/admin/webhooks/enable", b'{"url": "http://x/"}', 404, "not_found"),
                ("POST", "/v1/admin/webhooks/enable", b"{}", 422, "invalid_request"),
            ]
            for method, path, body, status, code in refusals:
                r = await client.request(method, path, content=body)
                assert (r.status_code, r.json()["error"]["code"]) == (status, code), (path, body)
        assert "Traceback" not in gw.log()
    finally:
        gw.stop()
        await receiver.stop()


# -- the outbox itself -------------------------------------------------------------------


@pytest.fixture(params=["postgres", "sqlite"])
def store_url(request, tmp_path) -> str:
    if request.param == "postgres":
        return request.getfixturevalue("pg_url")  # type: ignore[no-any-return]
    return f"sqlite:///{tmp_path}/outbox.db"


async def test_the_outbox_hands_out_queue_heads_and_retention_keeps_undelivered(store_url):
    from chat_gateway.storage import create_store

    store = create_store(store_url)
    await store.start()
    try:
        await store.migrate()
        outbox = store.outbox()
        endpoint, other = await outbox.register(["https://a.example/", "https://b.example/"])
        await store.append("quiet", "ana", "before webhooks")  # no receivers yet: no rows
        store.write_outbox([endpoint.id, other.id])
        for i in range(3):
            await store.append("r1", "ana", f"m{i}")
        await store.append_many([("r2", "bob", "x"), ("r2", "bob", "y")])
        keyed, created = await store.append("r3", "cy", "once", idempotency_key="k1")
        assert created
        again, created = await store.append("r3", "cy", "once", idempotency_key="k1")
        assert not created and again == keyed  # a repeat commits nothing, so no event
        assert {(b.endpoint_id, b.pending) for b in await outbox.backlog()} == {
            (endpoint.id, 6),
            (other.id, 6),
        }

        # Only heads: one per receiver and room, and never one that is leased.
        heads = await outbox.claim([endpoint.id], 10, lease=30)
        assert sorted((d.room, d.seq) for d in heads) == [("r1", 1), ("r2", 1), ("r3", 1)]
        assert orjson.loads(next(d for d in heads if d.room == "r3").data) == keyed.to_dict()
        assert await outbox.claim([endpoint.id], 10, lease=30) == []
        first = next(d for d in heads if d.room == "r1")
        assert first.event_id.startswith("evt_") and orjson.loads(first.data)["text"] == "m0"
        following = await outbox.delivered(first, 200, lease=30, chain=True)
        assert following is not None and (following.room, following.seq) == ("r1", 2)
        await outbox.retry(following, 3600, 500, "HTTP 500")  # due in an hour: r1 waits
        assert [d.room for d in await outbox.claim([endpoint.id], 10, lease=30)] == []

        # Retention removes messages, never an event that is not delivered; pruning
        # removes delivered events only.
        far = int(time.time() * 1000) + 86_400_000
        assert await store.delete_before(far, 100) == 7
        pending = {b.endpoint_id: b.pending for b in await outbox.backlog()}
        assert pending == {endpoint.id: 5, other.id: 6}
        assert await outbox.prune(far, 100) == 1
        assert {b.endpoint_id: b.pending for b in await outbox.backlog()} == pending
    finally:
        await store.close()


async def test_a_refresh_read_before_a_410_does_not_enable_the_receiver_again(tmp_path):
    """The dispatcher's periodic refresh reads every endpoint's state; a 410 handled
    while that read is under way must not be undone by the read's older answer
    (the receiver would be sent the event again and answer 410 twice)."""
    from prometheus_client import CollectorRegistry

    from chat_gateway.storage import create_store
    from chat_gateway.storage.outbox import Endpoint
    from chat_gateway.webhooks import Webhooks
    from chat_gateway.webhooks.metrics import WebhookMetrics

    store = create_store(f"sqlite:///{tmp_path}/hooks.db")
    await store.start()
    await store.migrate()
    settings = Settings(webhook_urls=("https://a.example/",), webhook_secret=new_secret())
    hooks = Webhooks(store, settings, WebhookMetrics(CollectorRegistry()))
    await hooks.start()
    try:
        (receiver,) = hooks.receivers.values()
        refresh = asyncio.create_task(hooks.refresh())
        await asyncio.sleep(0)  # the refresh is now reading the endpoints
        receiver.set_endpoint(Endpoint(receiver.endpoint.id, receiver.endpoint.url, "410 Gone"))
        await refresh
        assert receiver.endpoint.disabled
        await hooks.refresh()  # a later read, with nothing changed meanwhile, applies
        assert not receiver.endpoint.disabled  # (the 410 was never written to the store here)
    finally:
        await hooks.close()
        await store.close()


async def test_instances_claiming_at_once_never_share_a_row(pg_url):
    from chat_gateway.storage import create_store

    stores = [create_store(pg_url) for _ in range(4)]
    for s in stores:
        await s.start()
    try:
        await stores[0].migrate()
        (endpoint,) = await stores[0].outbox().register(["https://a.example/"])
        stores[0].write_outbox([endpoint.id])
        await stores[0].append_many([(f"room{i}", "ana", "x") for i in range(200)])
        claims = await asyncio.gather(
            *(s.outbox().claim([endpoint.id], 60, lease=30) for s in stores for _ in range(3))
        )
        ids = [d.id for claim in claims for d in claim]
        assert len(ids) == len(set(ids)) == 200
    finally:
        for s in stores:
            await s.close()


def test_backoff_draws_with_full_jitter_under_a_growing_bound_and_retry_after_wins():
    from chat_gateway.webhooks.dispatcher import Breaker, BreakerState, delay, retry_after

    backoff = Backoff(2, 60)
    for attempts, bound in ((1, 2), (2, 4), (3, 8), (5, 32), (6, 60), (40, 60)):
        delays = [delay(backoff, attempts) for _ in range(300)]
        assert all(0 <= d <= bound for d in delays)
        assert max(delays) > bound * 0.8 and min(delays) < bound * 0.2  # spread over it
    assert delay(backoff, 1, retry_after=120) == 120  # the receiver's word beats MAX
    assert delay(backoff, 1, retry_after=9999, longest_wait=600) == 600
    assert retry_after("7") == 7.0 and retry_after("soon") is None and retry_after(None) is None
    when = retry_after(email.utils.formatdate(time.time() + 30, usegmt=True))
    assert when is not None and 25 <= when <= 31

    breaker = Breaker(threshold=2, cooldown=10)
    breaker.failure(0)
    assert breaker.allows()
    breaker.failure(1)
    assert breaker.state is BreakerState.OPEN and not breaker.allows()
    assert not breaker.wants_probe(10.5)  # cooling down
    assert breaker.wants_probe(11) and breaker.state is BreakerState.HALF_OPEN
    breaker.probing = True
    assert not breaker.wants_probe(11)  # one probe at a time
    breaker.failure(12)  # the probe failed: open again, for a whole cool-down
    assert breaker.state is BreakerState.OPEN and not breaker.wants_probe(21)
    assert breaker.wants_probe(22)
    breaker.success()
    assert breaker.allows() and breaker.failures == 0


def test_the_bench_scenario_runs_on_tiny_sizes(tmp_path):
    import subprocess
    import sys

    from tests.harness import ROOT

    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "webhooks",
            "--json",
            str(out),
            "--hook-rooms",
            "5",
            "--hook-rate",
            "20",
            "--hook-seconds",
            "1",
            "--hook-backlog",
            "40",
            "--dead-seconds",
            "3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=t(180),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    latency, throughput, dead = orjson.loads(out.read_bytes())["results"]["webhooks"]
    assert latency["events"] == 20 and latency["p99_ms"] >= latency["p50_ms"] > 0
    assert throughput["events"] >= 40 and throughput["events_per_s"] > 0
    assert throughput["server_cpu_ms_per_event"] > 0
    # five queues failing: the breaker opens after five failures plus what was in flight
    assert 0 < dead["attempts"] <= 5 + 16 + 1


async def test_presence_changes_are_sent_best_effort(any_env):
    from tests.harness import WSClient

    receiver = await Receiver([new_secret()]).start()
    gw = Instance(hook_env(any_env, receiver)).start()
    try:
        await gw.wait_ready()

        def presence() -> list[tuple[str, dict[str, Any]]]:
            return [
                (h.payload["type"], h.payload["data"])
                for h in receiver.delivered()
                if h.payload["type"].startswith("presence.")
            ]

        async with WSClient.connect(gw.ws_url + "?user=ana") as ana:
            await ana.subscribe("p")
            await eventually(
                lambda: presence() == [("presence.joined", {"room": "p", "user": "ana"})], 10
            )
        await eventually(
            lambda: presence()[1:] == [("presence.left", {"room": "p", "user": "ana"})], 10
        )
        assert receiver.unverified == []
        ids = [
            h.headers["webhook-id"]
            for h in receiver.hits
            if h.payload["type"].startswith("presence.")  # user.online... go too
        ]
        assert len(set(ids)) == 2 and all(i.startswith("evt_") for i in ids)
    finally:
        gw.stop()
        await receiver.stop()
