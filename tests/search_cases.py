"""The messages and queries both stores (and the HTTP route) must answer alike.

``MESSAGES`` are posted in this order, one a millisecond or more apart; each case
names the messages it finds by their index in ``MESSAGES``, newest first.
"""

from __future__ import annotations

MESSAGES: list[tuple[str, str]] = [
    ("general", "The meeting moves to Thursday"),  # 0
    ("general", "Lunch after the meeting?"),  # 1
    ("random", "meetings are long"),  # 2
    ("general", "release notes for version 2.5 are out"),  # 3
    ("team:core", "Deploy the release on Friday"),  # 4
    ("team:core", "friday deploy went fine, no rollback"),  # 5
    ("team:web", "Web release: the new search box"),  # 6
    ("random", "foo_bar and foo-bar are two words each"),  # 7
    ("random", "Ünïcode wörds ÉCOLE"),  # 8
    ("team_x", "meeting in the underscore room"),  # 9
]

# (q, the indexes it finds, newest first)
CASES: list[tuple[str, list[int]]] = [
    ("meeting", [9, 2, 1, 0]),  # the last word is also a prefix: "meetings"
    ("meeting thursday", [0]),
    ('"the meeting"', [1, 0]),
    ('"meeting moves"', [0]),
    ('"moves meeting"', []),
    # a query ending in an excluded word has no prefix word
    ("meeting -lunch", [9, 0]),
    ('meeting -"after the"', [9, 0]),
    ("MEETING -Thursday -lunch", [9]),
    ("rel", [6, 4, 3]),
    ("release -deploy", [6, 3]),
    ("deploy friday", [5, 4]),
    ("2.5", [3]),
    ("foo-bar", [7]),
    ("foo bar words", [7]),
    ("wörds école", [8]),
    ("ünï", [8]),
    ("nothingmatches", []),
    ("friday -", [5, 4]),
]

# A scope as token claims (rooms, read_rooms), and the indexes "meeting release
# deploy" style queries find there: every case is also checked restricted.
SCOPED: list[tuple[tuple[str, ...] | None, tuple[str, ...] | None, str, list[int]]] = [
    (("general",), None, "meeting", [1, 0]),
    (("team:*",), None, "release", [6, 4]),
    (None, ("team:c*",), "release", [4]),
    (("random",), ("team:web",), "release", [6]),
    # "_" in a pattern is no wildcard: team_* is not team:*, and team* covers both
    (("team_*",), None, "meeting", [9]),
    (("team*",), None, "meeting", [9]),
    (("team*",), None, "release", [6, 4]),
    (("*",), None, "meeting", [9, 2, 1, 0]),
    (("nobody",), None, "meeting", []),
]
