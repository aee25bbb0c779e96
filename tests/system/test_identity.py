"""Identity from a real identity provider's keys, on real gateways.

The provider here is a JWKS served over HTTP by the test itself (a small
``http.server`` on a free loopback port) with keys made by ``cryptography``;
tokens are minted with PyJWT (or by hand, for the forgeries PyJWT refuses to
make). The server counts its requests, so fetch bounds are measured where the
fetches arrive.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from chat_gateway.access.auth import Authenticator
from chat_gateway.config import ConfigError, Settings
from tests.harness import Instance, SSEClient, WSClient, eventually, free_port, instances, t

ISSUER = "https://id.example.test/realms/chat"
AUDIENCE = "chat-gateway"
SECRET = "identity-secret-" + "0123456789abcdef" * 3


# -- the identity provider ---------------------------------------------------------


class Key:
    """A signing key pair and its public JWK."""

    def __init__(self, kind: str, kid: str | None = None) -> None:
        self.kid = kid or f"{kind}-{uuid.uuid4().hex[:8]}"
        if kind == "rsa":
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif kind in ("p256", "p384"):
            curve = ec.SECP256R1() if kind == "p256" else ec.SECP384R1()
            self.private = ec.generate_private_key(curve)
            jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = ed25519.Ed25519PrivateKey.generate()
            jwk = OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.alg = {"rsa": "RS256", "p256": "ES256", "p384": "ES384", "ed25519": "EdDSA"}[kind]
        self.jwk = {**jwk, "kid": self.kid, "use": "sig"}

    @property
    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(
        self,
        sub: str = "ana",
        *,
        exp: Any = 60,
        alg: str | None = None,
        kid: Any = "same",
        iss: str | None = ISSUER,
        aud: str | None = AUDIENCE,
        **claims: Any,
    ) -> str:
        payload: dict[str, Any] = {"sub": sub, **claims}
        if exp is not None:
            payload["exp"] = int(time.time() + exp) if isinstance(exp, (int, float)) else exp
        if iss is not None:
            payload["iss"] = iss
        if aud is not None:
            payload["aud"] = aud
        headers = {} if kid is None else {"kid": self.kid if kid == "same" else kid}
        return jwt.encode(payload, self.private, algorithm=alg or self.alg, headers=headers)


class JwksServer:
    """A JWKS endpoint on a loopback port; ``keys`` may change at any time, ``stop`` and
    ``start`` take it down and bring it back on the same port."""

    def __init__(self, *keys: Key) -> None:
        self.keys = list(keys)
        self.port = free_port()
        self.requests = 0
        self.raw: bytes | None = None  # served instead of ``keys`` when set
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks.json"

    def publish(self, *keys: Key) -> None:
        self.keys = list(keys)

    def start(self) -> JwksServer:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with provider._lock:
                    provider.requests += 1
                body = provider.raw or orjson.dumps({"keys": [k.jwk for k in provider.keys]})
                self.send_response(200 if self.path == "/jwks.json" else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except ConnectionError:
                    pass  # the gateway stopped reading a key set too large

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


@pytest.fixture
def provider() -> Any:
    server = JwksServer(Key("rsa")).start()
    try:
        yield server
    finally:
        server.stop()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_signed(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A token PyJWT would refuse to make: alg none, or HMAC keyed with a public key."""
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(payload))}"
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def hs_token(sub: str = "ana", *, exp: float = 60, secret: str = SECRET, **claims: Any) -> str:
    return jwt.encode(
        {"sub": sub, "exp": int(time.time() + exp), **claims}, secret, algorithm="HS256"
    )


def jwks_env(gateway_env: dict[str, str], server: JwksServer, **extra: str) -> dict[str, str]:
    return {
        **gateway_env,
        "AUTH_JWKS_URL": server.url,
        "AUTH_JWKS_ALLOW_HTTP": "true",  # the test's provider is on loopback
        "AUTH_ISSUER": ISSUER,
        "AUTH_AUDIENCE": AUDIENCE,
        "AUTH_LEEWAY": "0",
        "API_KEYS": "pub-key",
        "AUTH_JWKS_MIN_INTERVAL": "0.5",
        **extra,
    }


def full_log(instance: Instance) -> str:
    return Path(instance.log_path).read_text()


async def post_as(
    http: httpx.AsyncClient, base: str, tok: str, room: str = "lobby", text: str = "hi"
) -> httpx.Response:
    return await http.post(
        f"{base}/v1/rooms/{room}/messages", json={"text": text}, headers=bearer(tok)
    )


# -- keys from a JWKS ------------------------------------------------------------------


async def test_jwks_keys_rotate_with_no_restart_and_no_refused_token(gateway_env, provider):
    first = provider.keys[0]
    env = jwks_env(gateway_env, provider, AUTH_JWKS_REFRESH="2")
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        fetched_at_start = provider.requests
        assert fetched_at_start >= 1, "the key set is fetched at start"
        r = await post_as(http, gw.url, first.token("ana"))
        assert r.status_code == 201, r.text
        assert r.json()["author"] == "ana"

        async with WSClient.connect(f"{gw.ws_url}?token={first.token('ana')}") as ws:
            await ws.subscribe("lobby")
            # The provider publishes a new key and signs with it at once: the first
            # requests that name it wait for one shared fetch, none is refused.
            ec_key, ed_key = Key("p256"), Key("ed25519")
            provider.publish(first, ec_key)
            before = provider.requests
            answers = await asyncio.gather(
                *(
                    post_as(http, gw.url, ec_key.token(f"u{i}"), text=f"rotated {i}")
                    for i in range(20)
                )
            )
            assert [a.status_code for a in answers] == [201] * 20, [a.text for a in answers]
            assert provider.requests - before <= 2, "one fetch serves every waiting request"
            assert (await post_as(http, gw.url, first.token("ana"))).status_code == 201

            # The socket opened with the old key renews in band with the new one.
            await ws.send({"type": "refresh", "token": ec_key.token("ana", exp=120)})
            refreshed = await ws.expect("refreshed")
            assert refreshed["exp"] > time.time() + 100

            # The old key is withdrawn, a third appears: the new one is accepted (a
            # refresh frame naming it waits for the fetch like a request does), the
            # withdrawn one refused as soon as the gateway has seen the new set.
            provider.publish(ec_key, ed_key)
            await ws.send({"type": "refresh", "token": ed_key.token("ana", exp=120)})
            assert (await ws.expect("refreshed"))["exp"] > time.time() + 100
            r = await post_as(http, gw.url, ed_key.token("eve"))
            assert r.status_code == 201, r.text
            r = await post_as(http, gw.url, first.token("ana"))
            assert r.status_code == 401
            assert "not among the identity provider's keys" in r.json()["error"]["message"]
            # the renewed socket stays, with every message since it subscribed
            assert await ws.messages("lobby", 22) == list(range(2, 24))

        # The set is also fetched periodically (AUTH_JWKS_REFRESH=2), with no token asking.
        idle = provider.requests
        await eventually(lambda: provider.requests > idle, timeout=15)


async def test_every_refused_token_is_a_401_with_a_clear_message(gateway_env, provider):
    rsa_key = provider.keys[0]
    p256, p384, ed = Key("p256"), Key("p384"), Key("ed25519")
    provider.publish(rsa_key, p256, p384, ed)
    stranger = Key("rsa", kid=rsa_key.kid)  # same kid, a key the provider never published
    now = int(time.time())
    claims = {"sub": "ana", "exp": now + 60, "iss": ISSUER, "aud": AUDIENCE}
    async with (
        instances(1, jwks_env(gateway_env, provider)) as (gw,),
        httpx.AsyncClient(timeout=t(10)) as http,
    ):
        accepted = {
            "RS256": rsa_key.token(),
            "RS384": rsa_key.token(alg="RS384"),
            "RS512": rsa_key.token(alg="RS512"),
            "ES256": p256.token(),
            "ES384": p384.token(),
            "EdDSA": ed.token(),
            "aud list": rsa_key.token(aud=[AUDIENCE, "other"]),  # type: ignore[arg-type]
        }
        for case, tok in accepted.items():
            r = await http.get(f"{gw.url}/v1/rooms/lobby/messages", headers=bearer(tok))
            assert r.status_code == 200, (case, r.text)

        refused = {
            "wrong issuer": (rsa_key.token(iss="https://evil.example"), "issuer (iss)"),
            "no issuer": (rsa_key.token(iss=None), "no iss claim"),
            "wrong audience": (rsa_key.token(aud="another-app"), "audience (aud)"),
            "no audience": (rsa_key.token(aud=None), "no aud claim"),
            "unknown kid": (rsa_key.token(kid="never-published"), "not among"),
            "no kid": (rsa_key.token(kid=None), "no kid header"),
            "expired": (rsa_key.token(exp=-30), "expired"),
            "string exp": (rsa_key.token(exp=str(now + 3600)), "exp must be a number"),
            "no exp": (rsa_key.token(exp=None), "no exp claim"),
            "signed by another key": (stranger.token(), "signature does not verify"),
            "RS256 header on the EC key": (rsa_key.token(kid=p256.kid), "does not match its key"),
            "ES384 header on the P-256 key": (p384.token(kid=p256.kid), "does not match its key"),
            "PS256": (rsa_key.token(alg="PS256"), "algorithm 'PS256' is not accepted"),
            "HS256 keyed with the public key": (
                hand_signed(
                    {"alg": "HS256", "typ": "JWT", "kid": rsa_key.kid}, claims, rsa_key.public_pem
                ),
                "HS256 tokens are not accepted",
            ),
            "alg none": (
                hand_signed({"alg": "none", "typ": "JWT", "kid": rsa_key.kid}, claims, None),
                "algorithm 'none' is not accepted",
            ),
            "not a JWT": ("not.a.jwt", "not a valid JWT"),
        }
        for case, (tok, words) in refused.items():
            for method in ("POST", "GET"):
                r = await http.request(
                    method,
                    f"{gw.url}/v1/rooms/lobby/messages",
                    json={"text": "no"} if method == "POST" else None,
                    headers=bearer(tok),
                )
                assert r.status_code == 401, (case, method, r.text)
                error = r.json()["error"]
                assert error["code"] == "unauthorized", case
                assert words in error["message"], (case, error["message"])
        for case in ("wrong audience", "HS256 keyed with the public key", "alg none"):
            with pytest.raises(websockets.InvalidStatus) as exc:
                async with WSClient.connect(f"{gw.ws_url}?token={refused[case][0]}"):
                    pass
            assert exc.value.response.status_code == 401, case
        page = (
            await http.get(f"{gw.url}/v1/rooms/lobby/messages", headers=bearer(rsa_key.token()))
        ).json()
        assert page["messages"] == [], "no refused post stored anything"
        log = full_log(gw)
        lines = [orjson.loads(line) for line in log.splitlines() if line.strip()]
        assert not [
            line
            for line in lines
            if line["logger"].startswith("gateway") and line["level"] not in ("info", "warning")
        ]
        assert "Traceback" not in log


async def test_cached_keys_survive_a_provider_outage_and_bogus_kids_cannot_hammer_it(
    gateway_env, provider
):
    key = provider.keys[0]
    env = jwks_env(gateway_env, provider, AUTH_JWKS_REFRESH="1", AUTH_JWKS_MIN_INTERVAL="1")
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=t(20)) as http:
        assert (await post_as(http, gw.url, key.token())).status_code == 201

        provider.stop()
        await asyncio.sleep(t(2.5))  # periodic fetches fail meanwhile
        r = await post_as(http, gw.url, key.token(), text="during the outage")
        assert r.status_code == 201, r.text
        r = await post_as(http, gw.url, Key("rsa").token())
        assert r.status_code == 401 and "not among" in r.json()["error"]["message"]
        assert "keeping the keys fetched before (1)" in full_log(gw)

        down_at = provider.requests
        provider.start()
        await eventually(lambda: provider.requests > down_at, timeout=10)  # periodic is back
        # A flood of made-up kids: every token refused, the provider fetched at most
        # once per AUTH_JWKS_MIN_INTERVAL (plus the periodic refresh, same bound).
        count, started = provider.requests, time.monotonic()
        bogus = [key.token(kid=f"bogus-{i}") for i in range(150)]
        answers: list[httpx.Response] = []
        for i in range(0, len(bogus), 50):
            answers += await asyncio.gather(
                *(post_as(http, gw.url, tok) for tok in bogus[i : i + 50])
            )
        elapsed = time.monotonic() - started
        assert {a.status_code for a in answers} == {401}
        assert all("not among" in a.json()["error"]["message"] for a in answers)
        fetches = provider.requests - count
        assert 1 <= fetches <= elapsed / 1.0 + 2, (fetches, elapsed)

        # After the flood a genuinely new key is still picked up.
        fresh = Key("p384")
        provider.publish(key, fresh)
        assert (await post_as(http, gw.url, fresh.token())).status_code == 201


# -- a static public key and several secrets ----------------------------------------


async def test_public_key_and_rotated_secrets_side_by_side(gateway_env):
    pem_key, other = Key("p384"), Key("p256")
    old, new = SECRET, "rotated-" + "fedcba9876543210" * 3
    env = {
        **gateway_env,
        "AUTH_PUBLIC_KEY": pem_key.public_pem.decode(),
        "AUTH_SECRET": f"{old} {new}",
        "AUTH_LEEWAY": "0",
    }
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        for tok in (
            pem_key.token(kid=None, iss=None, aud=None),
            hs_token(secret=old),
            hs_token(secret=new),
        ):
            assert (await post_as(http, gw.url, tok)).status_code == 201
        claims = {"sub": "ana", "exp": int(time.time()) + 60}
        refused = {
            "a third secret": (hs_token(secret="third-" + "0" * 40), "signature"),
            "ES256 on the P-384 key": (other.token(kid=None), "does not match its key"),
            "HS256 keyed with the public key": (
                hand_signed({"alg": "HS256", "typ": "JWT"}, claims, pem_key.public_pem),
                "signature does not verify",
            ),
        }
        for case, (tok, words) in refused.items():
            r = await post_as(http, gw.url, tok)
            assert r.status_code == 401, case
            assert words in r.json()["error"]["message"], (case, r.text)

        # Auth on and API_KEYS unset: /v1/publish refuses everyone, and the start said so.
        r = await http.post(f"{gw.url}/v1/publish", json={"room": "lobby", "event": "e"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        assert "API_KEYS" in r.json()["error"]["message"]
        r = await http.post(
            f"{gw.url}/v1/publish", json={"room": "lobby", "event": "e"}, headers=bearer(hs_token())
        )
        assert r.status_code == 401
        assert "POST /v1/publish refuses every request" in full_log(gw)


async def test_a_string_exp_is_refused_with_a_shared_secret(gateway_env):
    env = {**gateway_env, "AUTH_SECRET": SECRET, "API_KEYS": "k"}
    far = str(int(time.time()) + 10**6)
    tok = jwt.encode({"sub": "ana", "exp": far}, SECRET, algorithm="HS256")
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        r = await post_as(http, gw.url, tok)
        assert r.status_code == 401 and "exp must be a number" in r.json()["error"]["message"]
        with pytest.raises(websockets.InvalidStatus) as exc:
            async with WSClient.connect(f"{gw.ws_url}?token={tok}"):
                pass
        assert exc.value.response.status_code == 401


async def test_a_sub_the_store_cannot_hold_is_refused_and_fails_nobody_else(gateway_env):
    """A validly signed token whose sub holds a NUL or a lone surrogate, or is blank,
    is refused (401) on every route, as an author would be (422); innocent posts
    committed in the same groups all succeed."""
    env = {**gateway_env, "AUTH_SECRET": SECRET}
    bad = {
        "NUL": (hs_token("ana\x00"), "must not contain NUL characters"),
        "lone surrogate": (hs_token("ana\ud800"), "no lone surrogates"),
        "blank": (hs_token("   "), "not all blank"),
    }
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=t(20)) as http:
        for case, (tok, words) in bad.items():
            r = await post_as(http, gw.url, tok)
            assert r.status_code == 401, (case, r.text)
            error = r.json()["error"]
            assert error["code"] == "unauthorized" and words in error["message"], (case, error)
            r = await http.get(f"{gw.url}/v1/rooms/lobby/messages", headers=bearer(tok))
            assert r.status_code == 401, (case, r.text)
            with pytest.raises(websockets.InvalidStatus) as exc:
                async with WSClient.connect(f"{gw.ws_url}?token={tok}"):
                    pass
            assert exc.value.response.status_code == 401, case

        innocent = [hs_token(f"user{i}") for i in range(30)]
        answers = await asyncio.gather(
            *(post_as(http, gw.url, tok, text=f"m{i}") for i, tok in enumerate(innocent)),
            *(post_as(http, gw.url, tok) for tok, _ in bad.values() for _ in range(3)),
        )
        assert [r.status_code for r in answers[:30]] == [201] * 30, [r.text for r in answers]
        assert {r.status_code for r in answers[30:]} == {401}
        page = (
            await http.get(f"{gw.url}/v1/rooms/lobby/messages", headers=bearer(innocent[0]))
        ).json()["messages"]
        assert sorted(m["author"] for m in page) == sorted(f"user{i}" for i in range(30))
        assert "Traceback" not in full_log(gw)


# -- permissions ------------------------------------------------------------------


async def test_read_rooms_allow_reading_and_refuse_posts(gateway_env):
    env = {**gateway_env, "AUTH_SECRET": SECRET, "API_KEYS": "k"}
    tok = hs_token("bo", rooms=["team:*"], read_rooms=["news:*", "team:announce"])
    reader = hs_token("cy", read_rooms=["news:*"])
    admin = hs_token("admin")
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        assert (await post_as(http, gw.url, tok, "team:red")).status_code == 201
        for room, words in (
            ("news:today", "read-only"),
            ("team:announce", "read-only"),
            ("other", "does not grant"),
        ):
            r = await post_as(http, gw.url, tok, room)
            assert r.status_code == 403, room
            assert r.json()["error"]["code"] == "forbidden"
            assert words in r.json()["error"]["message"], (room, r.text)
        for room in ("news:today", "lobby"):  # read_rooms alone grants no post anywhere
            assert (await post_as(http, gw.url, reader, room)).status_code == 403

        assert (await post_as(http, gw.url, admin, "news:today", "headline")).status_code == 201
        for who in (tok, reader):
            r = await http.get(f"{gw.url}/v1/rooms/news:today/messages", headers=bearer(who))
            assert r.status_code == 200 and r.json()["messages"][0]["text"] == "headline"
        r = await http.get(f"{gw.url}/v1/rooms/other/messages", headers=bearer(reader))
        assert r.status_code == 403

        async with SSEClient.open(
            f"{gw.url}/v1/rooms/news:today/events?since=0&token={reader}"
        ) as sse:
            assert sse.status == 200
            assert await sse.wait_for(1) == [1]

        async with WSClient.connect(f"{gw.ws_url}?token={tok}") as ws:
            assert (await ws.subscribe("news:today"))["seq"] == 1
            await ws.send({"type": "publish", "room": "news:today", "text": "x", "ref": 5})
            err = await ws.expect("error")
            assert err == {**err, "code": "forbidden", "ref": 5}
            assert "read-only" in err["message"]
            await ws.send({"type": "publish", "room": "team:red", "text": "ok", "ref": 6})
            assert (await ws.expect("ack"))["ref"] == 6
            assert (await post_as(http, gw.url, admin, "news:today", "second")).status_code == 201
            assert await ws.messages("news:today", 1) == [2]
        page = (
            await http.get(f"{gw.url}/v1/rooms/news:today/messages", headers=bearer(admin))
        ).json()
        assert [m["text"] for m in page["messages"]] == ["headline", "second"]


# -- in-band refresh ----------------------------------------------------------------


async def test_refresh_keeps_the_socket_past_the_old_expiry_and_applies_new_rooms(gateway_env):
    env = {**gateway_env, "AUTH_SECRET": SECRET, "AUTH_LEEWAY": "0", "API_KEYS": "k"}
    admin = hs_token("admin")
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=t(10)) as http:
        short = hs_token("dee", exp=t(2), rooms=["a", "b", "c:*"])
        async with WSClient.connect(f"{gw.ws_url}?token={short}") as ws:
            for room in ("a", "b", "c:1"):
                await ws.subscribe(room)

            # A refused token is an error frame; the current one stays in force.
            await ws.send(
                {"type": "refresh", "token": hs_token("dee", secret="x" * 40), "ref": "r0"}
            )
            err = await ws.expect("error")
            assert err["code"] == "unauthorized" and err["ref"] == "r0"

            renewed = hs_token("dee", exp=600, rooms=["a"], read_rooms=["c:*"])
            await ws.send({"type": "refresh", "token": renewed, "ref": "r1"})
            left = await ws.expect("unsubscribed")
            assert left["room"] == "b" and "does not grant" in left["reason"]
            answer = await ws.expect("refreshed")
            assert answer["ref"] == "r1"
            assert answer["exp"] == jwt.decode(renewed, options={"verify_signature": False})["exp"]
            assert [f["room"] for f in ws.frames if f["type"] == "unsubscribed"] == ["b"]

            await asyncio.sleep(t(2) + 1)  # past the first token's expiry
            for room in ("a", "b", "c:1"):
                assert (await post_as(http, gw.url, admin, room)).status_code == 201
            assert await ws.messages("a", 1) == [1]
            assert await ws.messages("c:1", 1) == [1]
            await ws.send({"type": "ping"})
            await ws.expect("pong")
            assert ws.seqs("b") == [], "a room no longer granted delivers nothing"
            # new permissions apply to frames too: c:* is now read-only
            await ws.send({"type": "publish", "room": "c:1", "text": "x", "ref": 1})
            assert (await ws.expect("error"))["code"] == "forbidden"
            await ws.send({"type": "subscribe", "room": "b"})
            assert (await ws.expect("error"))["code"] == "forbidden"

            # A token for another user closes the socket 1008.
            await ws.send({"type": "refresh", "token": hs_token("mallory", exp=600)})
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.expect("never", timeout=10)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            assert "another user" in closed.value.rcvd.reason


async def test_refresh_moves_the_expiry_earlier_too_and_is_refused_in_open_mode(gateway_env):
    env = {**gateway_env, "AUTH_SECRET": SECRET, "AUTH_LEEWAY": "0", "API_KEYS": "k"}
    async with instances(1, env) as (gw,):
        async with WSClient.connect(f"{gw.ws_url}?token={hs_token('fay', exp=600)}") as ws:
            await ws.subscribe("lobby")
            await ws.send({"type": "refresh", "token": hs_token("fay", exp=2)})
            await ws.expect("refreshed")
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await ws.expect("never", timeout=15)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1008
            assert "expired" in closed.value.rcvd.reason
    async with instances(1, gateway_env) as (gw,):
        async with WSClient.connect(gw.ws_url) as ws:
            await ws.send({"type": "refresh", "token": hs_token("fay")})
            err = await ws.expect("error")
            assert err["code"] == "invalid_request" and "open mode" in err["message"]


async def test_a_provider_down_at_start_is_picked_up_when_it_comes_back(gateway_env):
    key = Key("ed25519")
    server = JwksServer(key)  # not started yet
    try:
        async with (
            instances(1, jwks_env(gateway_env, server)) as (gw,),
            httpx.AsyncClient(timeout=t(10)) as http,
        ):
            assert "no signing keys from AUTH_JWKS_URL" in full_log(gw)
            r = await post_as(http, gw.url, key.token())
            assert r.status_code == 401 and "not among" in r.json()["error"]["message"]
            server.start()
            r = await post_as(http, gw.url, key.token())
            assert r.status_code == 201, r.text
    finally:
        server.stop()


# -- configuration ---------------------------------------------------------------------


def test_auth_settings_are_checked_at_start():
    from chat_gateway.core.public_keys import load_public_key

    rsa_key, ed = Key("rsa"), Key("ed25519")
    pem = rsa_key.public_pem.decode()
    body = "".join(pem.splitlines()[1:-1])  # Keycloak shows the bare base64
    for text in (pem, pem.replace("\n", "\\n"), body):
        assert load_public_key(text).algorithms == ("RS256", "RS384", "RS512")
    assert load_public_key(ed.public_pem.decode()).algorithms == ("EdDSA",)
    p521 = (
        ec.generate_private_key(ec.SECP521R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )

    bad = {
        "AUTH_PUBLIC_KEY": ({"AUTH_PUBLIC_KEY": "not a key"}, "AUTH_PUBLIC_KEY"),
        "a private key": (
            {
                "AUTH_PUBLIC_KEY": rsa_key.private.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ).decode()
            },
            "AUTH_PUBLIC_KEY",
        ),
        "P-521": ({"AUTH_PUBLIC_KEY": p521}, "cannot verify"),
        "file URL": ({"AUTH_JWKS_URL": "file:///etc/passwd"}, "AUTH_JWKS_URL"),
        "interval": (
            {
                "AUTH_JWKS_URL": "https://id.example/jwks",
                "AUTH_JWKS_REFRESH": "1",
                "AUTH_JWKS_MIN_INTERVAL": "5",
            },
            "AUTH_JWKS_MIN_INTERVAL",
        ),
    }
    for case, (env, words) in bad.items():
        with pytest.raises(ConfigError) as exc:
            Settings.from_env(env)
        assert words in str(exc.value), case
    assert Authenticator.from_settings(Settings.from_env({})).open_mode
    for env in (
        {"AUTH_SECRET": "a b"},
        {"AUTH_JWKS_URL": "https://id.example/jwks"},
        {"AUTH_PUBLIC_KEY": pem},
    ):
        assert not Authenticator.from_settings(Settings.from_env(env)).open_mode, env


# -- what a JWKS may be ------------------------------------------------------------------


def test_a_plain_http_jwks_url_needs_its_flag():
    url = "http://id.example/jwks"
    with pytest.raises(ConfigError, match="AUTH_JWKS_ALLOW_HTTP"):
        Settings.from_env({"AUTH_JWKS_URL": url})
    allowed = Settings.from_env({"AUTH_JWKS_URL": url, "AUTH_JWKS_ALLOW_HTTP": "true"})
    said = Authenticator.from_settings(allowed).warnings()
    assert any("plain http" in w for w in said), said
    https = Settings.from_env({"AUTH_JWKS_URL": "https://id.example/jwks"})
    assert not any("plain http" in w for w in Authenticator.from_settings(https).warnings())


async def test_a_gateway_refuses_to_start_on_a_plain_http_jwks(gateway_env, provider):
    env = {**jwks_env(gateway_env, provider)}
    del env["AUTH_JWKS_ALLOW_HTTP"]
    gw = Instance(env).start()
    assert gw.proc is not None
    try:
        assert gw.proc.wait(t(30)) == 2
    finally:
        gw.kill()
    assert "AUTH_JWKS_ALLOW_HTTP" in gw.log()
    assert provider.requests == 0


async def test_a_huge_or_crowded_jwks_is_refused_and_keys_are_logged_as_a_count(
    gateway_env, provider
):
    (key,) = provider.keys
    env = jwks_env(gateway_env, provider, AUTH_JWKS_REFRESH="1", LOG_LEVEL="info")
    newcomer = Key("rsa")

    def crowded(count: int) -> bytes:
        entries = [key.jwk, newcomer.jwk] + [{**key.jwk, "kid": f"k{i}"} for i in range(count)]
        return orjson.dumps({"keys": entries})

    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=30) as http:
        assert (await post_as(http, gw.url, key.token())).status_code == 201
        await eventually(lambda: "signing keys from" in full_log(gw))
        assert f"signing keys from {provider.url}: 1 (1 new, 0 gone)" in full_log(gw)

        provider.raw = crowded(150)  # 70 KB, but more keys than any provider lists
        await eventually(lambda: "more than 100" in full_log(gw), 20)
        assert (await post_as(http, gw.url, newcomer.token())).status_code == 401
        assert (await post_as(http, gw.url, key.token())).status_code == 201  # kept

        provider.raw = None
        await eventually(lambda: "fetched from" in full_log(gw) and "again" in full_log(gw), 20)
        provider.raw = crowded(20_000)  # about 10 MB
        assert len(provider.raw) > 8_000_000
        await eventually(lambda: "larger than" in full_log(gw), 30)
        assert (await post_as(http, gw.url, newcomer.token())).status_code == 401
        assert (await post_as(http, gw.url, key.token())).status_code == 201
        assert (await http.get(gw.url + "/healthz")).status_code == 200
    lines = full_log(gw).splitlines()
    assert max(len(line) for line in lines) < 2000
    assert not any("k19999" in line for line in lines)
