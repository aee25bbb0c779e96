"""Hooks the fuzz test's schemathesis runs load (``SCHEMATHESIS_HOOKS``).

A post's ``reply_to`` names a message of the same room: the schema can say it is a
seq, never which seqs exist there, so nearly every generated one would be the
documented 404 and the operation's valid-input rate would fall below what the
run accepts (``low_valid_rate``), leaving the post itself untested. Before such a
request goes out, a parent is posted in its room with the run's own credentials
(``FUZZ_BASE_URL``, ``FUZZ_HEADERS``) and ``reply_to`` is pointed at it: a
schema-valid integer stays a schema-valid integer, so every check still judges
the request as generated. A request whose room or body is not valid is left
alone (its refusal is what is checked). The 404 and 409 of a missing or deleted
parent are covered by tests/system/test_replies.py.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import httpx
import orjson
import schemathesis


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    del context, kwargs
    if case.method.upper() != "POST" or case.operation.path != "/v1/rooms/{room}/messages":
        return
    body, room = case.body, (case.path_parameters or {}).get("room")
    if not isinstance(body, dict) or not isinstance(room, str):
        return
    seq = body.get("reply_to")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return
    headers = orjson.loads(os.environ.get("FUZZ_HEADERS", "{}"))
    r = httpx.post(
        f"{os.environ['FUZZ_BASE_URL']}/v1/rooms/{quote(room, safe='')}/messages",
        json={"text": "a parent to reply to"},
        headers=headers,
        timeout=10,
    )
    if r.status_code == 201:
        body["reply_to"] = r.json()["seq"]
