"""Nothing outside the hub reads its rooms' or subscribers' fields: it asks the hub
(``Hub.room_stats``, ``held_rooms``, ``connections``, ``of_user``) or the
subscriber (``holds``, ``rooms``, ``position``). Read from the source, no import."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "chat_gateway"
HUB = SRC / "delivery" / "hub.py"
# Fields of Room and Subscriber that are the hub's own bookkeeping.
INSIDE = {
    "cursors",
    "ccursors",
    "catchups",
    "subs",
    "sequencer",
    "timers",
    "fill_task",
    "changes_task",
}
# The hub's own maps.
HUB_MAPS = {"rooms", "subscribers"}


def _named_hub(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "hub") or (
        isinstance(node, ast.Attribute) and node.attr == "hub"
    )


def test_no_module_outside_the_hub_reads_its_rooms_or_subscribers() -> None:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path == HUB:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Attribute):
                continue
            if node.attr in INSIDE or (node.attr in HUB_MAPS and _named_hub(node.value)):
                found.append(f"{path.relative_to(SRC)}:{node.lineno} .{node.attr}")
    assert not found, found
