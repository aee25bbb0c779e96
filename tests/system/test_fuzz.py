"""Schema-driven fuzzing of a running gateway, bounded in time.

Requests and frames are generated from the OpenAPI document the instance
serves: what the schemas call valid must succeed, and anything at all (valid,
nearly valid or garbage) must get a documented answer, never a 5xx or a crash.
Every run is made three times: in open mode, with user tokens and API keys
required (valid, expired, forged and garbage credentials drawn), and on the
embedded defaults (SQLite, in-process broker). On top of the strategies here,
schemathesis runs every check it has against the served document.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jsonschema
import jwt
import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_openapi
from websockets.sync.client import connect as ws_connect

from chat_gateway.errors import CODES
from tests import harness
from tests.harness import Instance

# Bounded: a fixed number of examples and no shrinking phase (a failure is
# reported as found), so the run takes seconds, not minutes.
FUZZ = settings(
    max_examples=50,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)


SECRET = "fuzz-secret-" + "0123456789abcdef" * 4
API_KEY = "fuzz-api-key-0123456789"
USER = "fuzzer"


def token(exp: float = 600, secret: str = SECRET) -> str:
    return jwt.encode({"sub": USER, "exp": int(time.time() + exp)}, secret, algorithm="HS256")


class Target:
    def __init__(self, inst: Instance, auth: bool) -> None:
        self.inst = inst
        self.auth = auth
        self.http = httpx.Client(base_url=inst.url, timeout=harness.t(10))
        self.spec: dict[str, Any] = self.http.get("/openapi.json").json()
        self.schemas = self.spec["components"]["schemas"]

    def schema(self, name: str) -> dict[str, Any]:
        return self.schemas[name]  # type: ignore[no-any-return]

    def resolving(self, name: str) -> dict[str, Any]:
        """Schema ``name`` with the document's components beside it, so that its
        references (a message's reactions, thread) resolve."""
        return {**self.schema(name), "components": self.spec["components"]}

    def user(self) -> dict[str, str]:
        """The headers of a request from a signed-in user (none needed in open mode)."""
        return {"Authorization": f"Bearer {token()}"} if self.auth else {}


# Credentials of every kind, good and bad, for requests that may carry any.
CREDENTIALS = st.sampled_from(
    ["none", "user", "expired", "forged", "api key", "garbage", "no token", "basic"]
)


def credential(kind: str) -> dict[str, str]:
    value = {
        "none": None,
        "user": f"Bearer {token()}",
        "expired": f"Bearer {token(-600)}",
        "forged": f"Bearer {token(secret='not-' + SECRET)}",
        "api key": f"Bearer {API_KEY}",
        "garbage": "Bearer a.b.c",
        "no token": "Bearer",
        "basic": "Basic ZnV6ejpmdXp6",
    }[kind]
    return {} if value is None else {"Authorization": value}


@pytest.fixture(scope="module", params=["open", "auth", "embedded"])
def target(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Target]:
    """Open mode and auth mode on Postgres and Redis; open mode on the embedded
    defaults (SQLite, in-process broker)."""
    auth = request.param == "auth"
    embedded = request.param == "embedded"
    db = (
        f"sqlite:///{tmp_path_factory.mktemp('fuzz')}/chat.db"
        if embedded
        else asyncio.run(harness.create_database())
    )
    prefix = harness.new_prefix()
    env = {
        "DATABASE_URL": db,
        "REDIS_URL": "memory://" if embedded else harness.REDIS_URL,
        "KEY_PREFIX": prefix,
        "RATE_LIMIT": "1000000/1s",
        "CONNECT_RATE_LIMIT": "1000000/1s",
        "PUBLISH_RATE_LIMIT": "1000000/1s",
        "SUBSCRIBE_RATE_LIMIT": "1000000/1s",
        "LOG_LEVEL": "warning",
    }
    if auth:
        env.update({"AUTH_SECRET": SECRET, "API_KEYS": API_KEY})
    inst = Instance(env).start()
    try:
        asyncio.run(inst.wait_ready())
        tgt = Target(inst, auth)
        yield tgt
        tgt.http.close()
        assert inst.proc is not None and inst.proc.poll() is None, inst.log()
        assert "Traceback" not in inst.log(), inst.log()
    finally:
        inst.stop()
        if not embedded:
            asyncio.run(harness.drop_database(db))
            asyncio.run(harness.delete_prefix(prefix))


# -- strategies from the declared schemas ------------------------------------------------


def from_schema(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "const" in schema:
        return st.just(schema["const"])
    if "oneOf" in schema:
        return st.one_of(*(from_schema(s) for s in schema["oneOf"]))
    kind = schema.get("type")
    if kind == "string":
        lo, hi = schema.get("minLength", 0), schema.get("maxLength", 200)
        if "pattern" in schema:
            strat = st.from_regex(re.compile(schema["pattern"].strip("^$")), fullmatch=True)
            strat = strat.filter(lambda s: lo <= len(s) <= hi)
        else:
            strat = st.text(min_size=lo, max_size=min(hi, 200))
        if "not" in schema:
            strat = strat.filter(lambda s: s not in schema["not"]["enum"])
        return strat
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "array":
        return st.lists(from_schema(schema["items"]), max_size=schema.get("maxItems", 10))
    if kind == "object" and "properties" in schema:
        props = schema["properties"]
        required = schema.get("required", [])
        return st.fixed_dictionaries(
            {k: from_schema(props[k]) for k in required},
            optional={k: from_schema(v) for k, v in props.items() if k not in required},
        )
    if kind == "object":
        return st.dictionaries(st.text(max_size=10), JSON, max_size=4)
    raise AssertionError(f"no strategy for {schema}")


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def mutated(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Objects close to ``schema``: valid ones with a field dropped, retyped or added."""

    def mutate(obj: dict[str, Any], data: st.DataObject) -> Any:
        obj = dict(obj)
        how = data.draw(st.sampled_from(["drop", "retype", "add", "keep"]))
        keys = sorted(obj)
        if how == "drop" and keys:
            obj.pop(data.draw(st.sampled_from(keys)))
        elif how == "retype" and keys:
            obj[data.draw(st.sampled_from(keys))] = data.draw(JSON)
        elif how == "add":
            obj[data.draw(st.text(max_size=8))] = data.draw(JSON)
        return obj

    return st.builds(mutate, from_schema(schema), st.data())


def assert_documented(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.request.method, r.request.url, r.text)
    if r.status_code >= 400:
        body = r.json()
        assert body["error"]["code"] in CODES and body["error"]["message"], body


ROOM = {"type": "string", "pattern": r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$", "maxLength": 128}
# A room name, or any text at all, percent-encoded so that it reaches the server as is.
PATH_SEGMENT = st.one_of(from_schema(ROOM), st.text(min_size=1, max_size=20)).map(
    lambda s: quote(s, safe="") if s not in {".", ".."} else "%2E" * len(s)
)


# -- the fuzz runs ---------------------------------------------------------------------


def test_the_served_openapi_document_is_valid_and_matches_the_checks(target):
    validate_openapi(target.spec)
    assert set(target.spec["paths"]) >= {
        "/v1/rooms/{room}/messages",
        "/v1/publish",
        "/v1/ws",
        "/v1/rooms/{room}/events",
    }
    room = target.spec["paths"]["/v1/rooms/{room}/messages"]["post"]["parameters"][0]
    assert room["schema"] == ROOM
    r = target.http.post(
        "/v1/rooms/x/messages", json={"text": "hi", "nope": 1}, headers=target.user()
    )
    assert r.status_code == 422
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"text": "hi", "nope": 1}, target.schema("PostMessage"))


@FUZZ
@given(data=st.data())
def test_schema_valid_posts_are_stored_as_sent(target, data):
    room = data.draw(from_schema(ROOM), "room")
    body = data.draw(from_schema(target.schema("PostMessage")), "body")
    if "reply_to" in body:
        # A schema can say a reply_to is a seq, not which seqs exist in the room (a
        # missing one is the documented 404, a deleted one 409): a reply goes to a
        # message posted for it, so every schema-valid body is still stored as sent.
        parent = target.http.post(
            f"/v1/rooms/{room}/messages", json={"text": "parent"}, headers=target.user()
        )
        assert parent.status_code == 201, parent.text
        body["reply_to"] = parent.json()["seq"]
    r = target.http.post(f"/v1/rooms/{room}/messages", json=body, headers=target.user())
    assert r.status_code == 201, (room, body, r.text)
    msg = r.json()
    jsonschema.validate(msg, target.resolving("Message"))
    assert msg["room"] == room and msg["text"] == body["text"].strip()
    assert msg.get("reply_to") == body.get("reply_to")
    assert msg.get("mentions", []) == list(dict.fromkeys(body.get("mentions", [])))
    # signed in, the author is the token's subject whatever the body says
    assert msg["author"] == (USER if target.auth else body.get("author", "anonymous").strip())
    params = target.spec["paths"]["/v1/rooms/{room}/messages"]["get"]["parameters"]
    query = data.draw(
        from_schema(
            {
                "type": "object",
                "properties": {p["name"]: p["schema"] for p in params if p["in"] == "query"},
            }
        ),
        "query",
    )
    page = target.http.get(f"/v1/rooms/{room}/messages", params=query, headers=target.user())
    assert page.status_code == 200, page.text
    for m in page.json()["messages"]:
        jsonschema.validate(m, target.resolving("Message"))


@FUZZ
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=st.one_of(
        st.builds("/v1/rooms/{}/messages".format, PATH_SEGMENT),
        st.builds("/v1/rooms/{}/events".format, PATH_SEGMENT),
        st.just("/v1/publish"),
        st.just("/healthz"),
        st.just("/openapi.json"),
        st.builds("/v1/{}".format, PATH_SEGMENT),
    ),
    query=st.dictionaries(
        st.sampled_from(["limit", "before", "after", "since", "x"]),
        st.text(max_size=25),
        max_size=3,
    ),
    body=st.one_of(
        mutated(
            {
                "type": "object",
                "properties": {"text": {"type": "string"}, "author": {"type": "string"}},
                "required": ["text"],
            }
        ),
        mutated(
            {
                "type": "object",
                "properties": {
                    "room": ROOM,
                    "event": {"type": "string"},
                    "data": {"type": "object"},
                },
                "required": ["room", "event"],
            }
        ),
        JSON,
        st.binary(max_size=64),
    ),
    key=st.none() | st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=140),
    creds=CREDENTIALS,
)
def test_any_request_gets_a_documented_answer(target, method, path, query, body, key, creds):
    headers = {"Idempotency-Key": key} if key is not None else {}
    headers.update(credential(creds))
    if "/events" in path and method == "GET":
        since = query.pop("since", "x")
        headers["Last-Event-ID"] = since if since.isascii() and since.isprintable() else "x"
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    with target.http.stream(method, path, params=query, content=content, headers=headers) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            assert r.status_code == 200
            return
        r.read()
    assert_documented(r)


# Answers a valid frame may still get, from the state it meets: no such message,
# someone else's, typing in a room not subscribed, a publish key drawn again for
# another text in the same room.
STATEFUL: dict[str, set[tuple[str, Any]]] = {
    # a reply_to drawn at random: no such message, or a deleted one
    "publish": {
        ("idempotency_conflict", None),
        ("not_found", "reply_to"),
        ("message_deleted", "reply_to"),
    },
    "edit": {("not_found", None), ("forbidden", None)},
    "delete": {("not_found", None), ("forbidden", None)},
    # no such message (or a deleted one) to react to
    "react": {("not_found", None), ("message_deleted", None)},
    "unreact": {("not_found", None), ("message_deleted", None)},
    "typing": {("invalid_request", "room")},
    # a room's kind is its namespace's (NAMESPACES_FILE): with none set, every room is
    # stored, and an emit there is refused
    "emit": {("wrong_room_kind", None)},
}


@FUZZ
@given(frames=st.lists(st.data(), min_size=1, max_size=5))
def test_any_ws_frame_gets_a_documented_answer_and_the_socket_stays(target, frames):
    kinds = sorted(k for k in target.schemas if k.startswith("Frame."))
    url = target.inst.ws_url + (f"?token={token()}" if target.auth else "?user=fuzz")
    with ws_connect(url, open_timeout=harness.t(10), max_size=2**22) as ws:
        for n, data in enumerate(frames):
            which = data.draw(st.sampled_from(["valid", "mutated", "json", "text", "binary"]))
            if which in ("valid", "mutated"):
                schema = target.schema(data.draw(st.sampled_from(kinds)))
                frame = data.draw(from_schema(schema) if which == "valid" else mutated(schema))
                ws.send(orjson.dumps(frame).decode())
            elif which == "json":
                frame = data.draw(JSON)
                ws.send(orjson.dumps(frame).decode())
            elif which == "text":
                frame = data.draw(st.text(max_size=50))
                ws.send(frame)
            else:
                frame = data.draw(st.binary(max_size=50))
                ws.send(frame)
            ws.send(orjson.dumps({"type": "ping", "ref": f"sync{n}"}).decode())
            answers = []
            while True:
                got = orjson.loads(ws.recv(timeout=harness.t(10)))
                if got == {"type": "pong", "ref": f"sync{n}"}:
                    break
                answers.append(got)
            for got in answers:
                assert got["type"] in {
                    "subscribed",
                    "unsubscribed",
                    "ack",
                    "message",
                    "event",
                    "presence",
                    "error",
                    "pong",
                    "refreshed",
                    "message_updated",
                    "message_deleted",
                    "reactions_updated",
                    "thread_updated",
                    "typing",
                    "read",
                }, got
                if got["type"] == "error":
                    assert got["code"] in CODES and got["code"] != "internal", (frame, got)
            # a refresh frame's token is a schema-valid string, not a verifiable token
            if which == "valid" and frame["type"] != "refresh":
                errors = [
                    a
                    for a in answers
                    if a["type"] == "error"
                    and (a["code"], a.get("field")) not in STATEFUL.get(frame["type"], ())
                ]
                assert not errors, (frame, errors)


# -- schemathesis --------------------------------------------------------------------


# Every warning but two that name what these targets are by design: the server
# routes answer only 401 on the open targets (they always need a key, and those
# run without API_KEYS), and the webhook admin routes only 404 (WEBHOOK_URLS is
# unset). Their answers are still checked against the document.
WARNINGS = [
    "base_url_mismatch",
    "validation_mismatch",
    "missing_deserializer",
    "unused_openapi_auth",
    "unsupported_regex",
    "method_not_allowed",
    "constants_extraction",
    "unmatched_filter",
    "unresolvable_reference",
    "low_valid_rate",
    "rate_limited",
    "dictionary_mismatch",
    "timeout_units",
]


def schemathesis(
    target: Target, tmp_path: Path, paths: list[str], *args: str, headers: dict[str, str]
) -> None:
    """One ``schemathesis run --checks all`` over ``paths`` of the served document;
    its report is the assertion message."""
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{target.inst.url}/openapi.json",
        "--checks",
        "all",
        "--no-shrink",
        "--warnings",
        ",".join(WARNINGS),
        *args,
    ]
    # Invalid input may also meet the server's own limits before the app: a request
    # line and headers past 16 KiB (431) or a body past MAX_BODY_BYTES (413).
    (tmp_path / "schemathesis.toml").write_text(
        "[checks.negative_data_rejection]\n"
        'expected-statuses = ["400", "401", "403", "404", "405", "406", "409", "413", '
        '"415", "422", "428", "429", "431", "5xx"]\n'
    )
    if os.environ.get("FUZZ_SEED"):  # replays a reported run: FUZZ_SEED=<its seed>
        cmd += ["--seed", os.environ["FUZZ_SEED"]]
    for path in paths:
        cmd += ["--include-path", path]
    for name, value in headers.items():
        cmd += ["-H", f"{name}: {value}"]
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": str(Path(__file__).with_name("schemathesis_hooks.py")),
        "FUZZ_BASE_URL": target.inst.url,
        "FUZZ_HEADERS": orjson.dumps(headers).decode(),
    }
    run = subprocess.run(
        cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=harness.t(180)
    )
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:] + target.inst.log()[-4000:]
    assert "No issues found" in run.stdout, run.stdout[-6000:]


def test_schemathesis_finds_nothing(target, tmp_path):
    """Every check (status codes and headers documented, schema-valid requests
    accepted and invalid ones refused, responses and SSE events matching their
    schemas, Allow on 405s, ...) over every route, each with its credential in
    auth mode (a user token; an API key on the backend routes). ``/v1/ws``
    speaks WebSocket only (over plain HTTP it answers the documented 426); its
    frames are fuzzed above. An accepted event stream is read for the whole
    request timeout, so streams are generated apart: refused cases (quick) from
    the coverage and fuzzing phases, accepted ones from a few fuzzing examples,
    each read for 1 s."""
    paths = target.spec["paths"]
    streams = {
        p
        for p, ops in paths.items()
        if "text/event-stream"
        in ops.get("get", {}).get("responses", {}).get("200", {}).get("content", {})
    }
    by_key = {
        p
        for p, ops in paths.items()
        if any({"apiKey": []} in op.get("security", []) for op in ops.values())
    }
    groups = [(target.user(), set(paths) - {"/v1/ws"} - (by_key if target.auth else set()))]
    if target.auth:
        groups.append(({"Authorization": f"Bearer {API_KEY}"}, by_key))
    for headers, group in groups:
        plain, stream = sorted(group - streams), sorted(group & streams)
        schemathesis(
            target,
            tmp_path,
            plain,
            "-n",
            "5",
            "--request-timeout",
            str(harness.t(10)),
            headers=headers,
        )
        if stream:
            schemathesis(
                target,
                tmp_path,
                stream,
                "--mode",
                "negative",
                "-n",
                "5",
                "--request-timeout",
                str(harness.t(2)),
                headers=headers,
            )
            schemathesis(
                target,
                tmp_path,
                stream,
                "--mode",
                "positive",
                "--phases",
                "fuzzing",
                "-n",
                "3",
                "--request-timeout",
                "1",
                headers=headers,
            )
