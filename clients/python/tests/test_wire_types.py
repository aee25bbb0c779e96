"""The clients' types against the server's own JSON Schemas, so that no field drifts.

Two links, each checked here:

1. What a gateway sends matches ``/openapi.json``: every frame a real gateway sends
   on ``/v1/ws`` (its ``x-server-frames``) and every message of a history page
   validates against its schema, and carries no field the schema leaves out. A new
   field the server starts sending fails here until the schema declares it.
2. The schemas match the clients' types: for ``Message`` and each server frame the
   clients hand on, the fields of ``clients/js/src/index.d.ts`` and of the Python
   dataclasses are the schema's, optional (``?`` / ``None`` allowed) exactly where the
   schema does not require them, and ``null`` (``| null`` / ``None``) where the schema
   says so. A field added to the schema fails here until both clients declare it.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any

import chat_gateway_client as py
import httpx
import jsonschema
import pytest

from tests.harness import ROOT, WSClient, instances

DTS = ROOT / "clients" / "js" / "src" / "index.d.ts"

# schema -> (index.d.ts interface, Python class, fields the client adds of its own)
TYPES: dict[str, tuple[str, type, set[str]]] = {
    "Message": ("Message", py.Message, {"raw"}),
    "ServerFrame.subscribed": ("SubscribedEvent", py.Subscribed, set()),
    "ServerFrame.message_updated": ("ChangeEvent", py.Change, {"kind"}),
    "ServerFrame.message_deleted": ("ChangeEvent", py.Change, {"kind"}),
    "ServerFrame.reactions_updated": ("ReactionsUpdatedEvent", py.ReactionsUpdated, set()),
    "ServerFrame.thread_updated": ("ThreadUpdatedEvent", py.ThreadUpdated, set()),
    "Thread": ("Thread", py.Thread, set()),
    "Version": ("Version", py.Version, set()),
    "ServerFrame.typing": ("TypingEvent", py.Typing, set()),
    "ServerFrame.read": ("ReadEvent", py.Read, {"frame"}),
    "ServerFrame.presence": ("PresenceEvent", py.Presence, set()),
    "ServerFrame.event": ("EphemeralEvent", py.Event, set()),
    "ServerFrame.unsubscribed": ("UnsubscribedEvent", py.Unsubscribed, set()),
    "ReadPosition": ("ReadState", py.ReadState, set()),
}


def spec() -> dict[str, Any]:
    from chat_gateway.server.openapi import document

    return document()


def schema_of(doc: dict[str, Any], name: str) -> dict[str, Any]:
    if name == "ReadPosition":
        return dict(doc["components"]["schemas"]["ServerFrame.ack"]["properties"]["read"])
    return dict(doc["components"]["schemas"][name])


def nullable(prop: dict[str, Any]) -> bool:
    kind = prop.get("type")
    return kind == "null" or (isinstance(kind, list) and "null" in kind)


def dts_interfaces(text: str) -> dict[str, dict[str, tuple[bool, bool]]]:
    """``interface Name { field?: type; }`` -> {Name: {field: (optional, nullable)}}."""
    out: dict[str, dict[str, tuple[bool, bool]]] = {}
    for m in re.finditer(r"^export interface (\w+) \{\n(.*?)^\}", text, re.M | re.S):
        body = re.sub(r"/\*.*?\*/", "", m.group(2), flags=re.S)
        fields: dict[str, tuple[bool, bool]] = {}
        for line in body.splitlines():
            f = re.match(r"\s*(\w+)(\??):\s*(.+?);\s*(//.*)?$", line)
            if f:
                kinds = {k.strip() for k in f.group(3).split("|")}
                fields[f.group(1)] = (f.group(2) == "?", "null" in kinds)
        out[m.group(1)] = fields
    return out


def py_fields(cls: type) -> dict[str, tuple[bool, bool]]:
    """A dataclass' fields -> (may be left out: has a default, may be None)."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[bool, bool]] = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
        has_default = (
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        )
        out[f.name] = (has_default, type(None) in args or hint is type(None))
    return out


def drift(
    schema: dict[str, Any], declared: dict[str, tuple[bool, bool]], own: set[str]
) -> list[str]:
    """How declared fields differ from the schema's, one sentence each."""
    props = {k: p for k, p in schema["properties"].items() if k != "type"}
    required = set(schema.get("required", ())) - {"type"}
    problems = []
    for name, prop in props.items():
        if name not in declared:
            problems.append(f"{name} is missing")
            continue
        optional, null = declared[name]
        if optional != (name not in required):
            problems.append(f"{name} is {'optional' if optional else 'required'}")
        if null != nullable(prop):
            problems.append(f"{name} is {'nullable' if null else 'not nullable'}")
    for name in set(declared) - set(props) - own:
        problems.append(f"{name} is not in the schema")
    return problems


def py_drift(schema: dict[str, Any], cls: type, own: set[str]) -> list[str]:
    """Python has one None for absent and null: a field the schema does not require
    or allows null must admit None; a required, non-null one must not."""
    props = {k: p for k, p in schema["properties"].items() if k != "type"}
    required = set(schema.get("required", ())) - {"type"}
    fields = py_fields(cls)
    problems = []
    for name, prop in props.items():
        if name not in fields:
            problems.append(f"{name} is missing")
            continue
        may_none = fields[name][1]
        should = name not in required or nullable(prop)
        if may_none != should:
            problems.append(f"{name} {'admits' if may_none else 'does not admit'} None")
    for name in set(fields) - set(props) - own:
        problems.append(f"{name} is not in the schema")
    return problems


@pytest.mark.parametrize("name", sorted(TYPES))
def test_client_types_match_the_server_schema(name: str) -> None:
    doc = spec()
    schema = schema_of(doc, name)
    interface, cls, own = TYPES[name]
    declared = dts_interfaces(DTS.read_text()).get(interface)
    assert declared is not None, f"index.d.ts declares no interface {interface}"
    assert drift(schema, declared, own) == [], f"index.d.ts {interface} vs {name}"
    assert py_drift(schema, cls, own) == [], f"Python {cls.__name__} vs {name}"


def test_every_server_frame_the_clients_read_has_a_type() -> None:
    frames = set(spec()["paths"]["/v1/ws"]["get"]["x-server-frames"])
    handled = {n.split(".", 1)[1] for n in TYPES if n.startswith("ServerFrame.")}
    # answers the clients consume themselves (matched to their requests)
    internal = {"message", "ack", "error", "pong", "refreshed", "history_purged"}
    assert frames - handled - internal == set()


def test_gateway_errors_carry_the_error_frame_fields() -> None:
    error = spec()["components"]["schemas"]["ServerFrame.error"]["properties"]
    err = py.GatewayError("c", "m", status=400, retry_after=1.0)
    for field in ("code", "message", "retry_after"):
        assert field in error and hasattr(err, field)
    dts = DTS.read_text()
    block = re.search(r"export declare class GatewayError .*?^\}", dts, re.M | re.S)
    assert block is not None
    for field in ("code", "message", "status", "retryAfter", "detail"):
        assert re.search(rf"^\s*{field}\??:", block.group(0), re.M), field


def test_the_drift_check_sees_drift() -> None:
    """The comparison itself: each kind of drift is reported."""
    schema = {
        "required": ["a"],
        "properties": {"a": {"type": "string"}, "b": {"type": ["string", "null"]}},
    }
    assert drift(schema, {"a": (False, False), "b": (True, True)}, set()) == []
    assert drift(schema, {"a": (False, False), "b": (True, False)}, set()) == ["b is not nullable"]
    assert drift(schema, {"a": (True, False)}, set()) == ["a is optional", "b is missing"]
    assert drift(schema, {"a": (False, False), "b": (True, True), "c": (False, False)}, set()) == [
        "c is not in the schema"
    ]
    parsed = dts_interfaces("export interface X {\n  /** doc */\n  a?: string | null;\n}\n")
    assert parsed == {"X": {"a": (True, True)}}


def validator(doc: dict[str, Any], name: str) -> jsonschema.Draft202012Validator:
    root = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return jsonschema.Draft202012Validator(root)


def undeclared(doc: dict[str, Any], name: str, obj: dict[str, Any]) -> set[str]:
    schema = doc["components"]["schemas"][name]
    extra = set(obj) - set(schema["properties"])
    for key in ("message",):
        prop = schema["properties"].get(key, {})
        if isinstance(obj.get(key), dict) and prop.get("$ref", "").endswith("/Message"):
            extra |= {f"message.{k}" for k in undeclared(doc, "Message", obj[key])}
    return extra


async def until_seen(client: WSClient, *kinds: str) -> None:
    """Read frames (kept in ``client.frames``) until each kind has come."""
    while not set(kinds) <= {f["type"] for f in client.frames}:
        await client.recv()


async def test_what_a_gateway_sends_matches_its_schemas(gateway_env: dict[str, str]) -> None:
    env = {**gateway_env, "API_KEYS": "key-1"}
    async with instances(1, env) as (gw,), httpx.AsyncClient(timeout=10) as http:
        doc = (await http.get(gw.url + "/openapi.json")).json()
        ws = gw.ws_url
        async with (
            WSClient.connect(ws + "?user=ana") as ana,
            WSClient.connect(ws + "?user=bob") as bob,
        ):
            for c in (ana, bob):
                await c.send({"type": "subscribe", "room": "wire", "since": 0})
                await c.expect("subscribed")
            await ana.send({"type": "publish", "room": "wire", "text": "hi", "ref": "p1"})
            await ana.expect("ack")
            await ana.send({"type": "edit", "room": "wire", "seq": 1, "text": "hey", "ref": "e"})
            await ana.expect("ack")
            await ana.send({"type": "publish", "room": "wire", "text": "two", "ref": "p2"})
            await ana.expect("ack")
            await ana.send({"type": "delete", "room": "wire", "seq": 2, "ref": "d"})
            await ana.expect("ack")
            await ana.send(
                {"type": "react", "room": "wire", "seq": 1, "reaction": "ok", "ref": "x1"}
            )
            await ana.expect("ack")
            await ana.send(
                {
                    "type": "publish",
                    "room": "wire",
                    "text": "re",
                    "reply_to": 1,
                    "mentions": ["bob"],
                    "ref": "p3",
                }
            )
            await ana.expect("ack")
            await ana.send({"type": "typing", "room": "wire"})
            await ana.send({"type": "read", "room": "wire", "seq": 1, "ref": "r"})
            await ana.expect("ack")
            await ana.send({"type": "ping", "ref": "x"})
            await ana.expect("pong")
            await ana.send({"type": "subscribe", "room": "-bad"})
            await ana.expect("error")
            r = await http.post(
                gw.url + "/v1/publish",
                json={"room": "wire", "event": "deploy", "data": {"v": 1}},
                headers={"authorization": "Bearer key-1"},
            )
            assert r.status_code == 202
            await until_seen(
                bob,
                "message_updated",
                "message_deleted",
                "reactions_updated",
                "thread_updated",
                "typing",
                "read",
            )
            await until_seen(bob, "event")
            await ana.send({"type": "unsubscribe", "room": "wire"})
            await ana.expect("unsubscribed")
            await until_seen(bob, "presence")
            r = await http.delete(
                gw.url + "/v1/server/rooms/wire/messages",
                headers={"authorization": "Bearer key-1"},
            )
            assert r.status_code == 200
            await until_seen(bob, "history_purged")
            frames = ana.frames + bob.frames
        seen = {f["type"] for f in frames}
        # every frame but `refreshed`, which needs auth mode (tests/system/test_auth.py)
        assert seen | {"refreshed"} == set(doc["paths"]["/v1/ws"]["get"]["x-server-frames"])
        for frame in frames:
            name = f"ServerFrame.{frame['type']}"
            errors = [e.message for e in validator(doc, name).iter_errors(frame)]
            assert errors == [], (frame, errors)
            assert undeclared(doc, name, frame) == set(), frame
        # history: a message never changed, an edited one and a tombstone
        for text in ("plain", "to edit", "to delete"):
            await http.post(gw.url + "/v1/rooms/hist/messages", json={"text": text})
        await http.patch(gw.url + "/v1/rooms/hist/messages/2", json={"text": "edited"})
        await http.request("DELETE", gw.url + "/v1/rooms/hist/messages/3", json={})
        page = (await http.get(gw.url + "/v1/rooms/hist/messages")).json()["messages"]
        assert [m.get("deleted_at") is None for m in page] == [True, True, False]
        assert "deleted_at" not in page[0] and page[1]["deleted_at"] is None
        for m in page:
            assert [e.message for e in validator(doc, "Message").iter_errors(m)] == []
            assert undeclared(doc, "Message", m) == set(), m


def test_the_type_file_is_the_one_published() -> None:
    assert DTS.exists() and Path(DTS).read_text().startswith("// Type declarations")
