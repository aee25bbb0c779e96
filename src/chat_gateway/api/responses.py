"""JSON responses: a body encoded with orjson, or one already encoded."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return encoded_json_response(orjson.dumps(body), status, headers)


def encoded_json_response(
    data: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A response whose JSON body is already encoded."""
    return Response(data, status_code=status, headers=headers, media_type="application/json")
