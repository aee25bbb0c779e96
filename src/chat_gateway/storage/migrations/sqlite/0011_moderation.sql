-- Moderation per room: the room's row holds its restrictions (JSON objects, user ->
-- {"until": epoch ms or null, "reason", "by", "at"}) and its slow mode; an append
-- reads them inside its BEGIN IMMEDIATE.
ALTER TABLE rooms ADD COLUMN banned    TEXT    NOT NULL DEFAULT '{}';
ALTER TABLE rooms ADD COLUMN muted     TEXT    NOT NULL DEFAULT '{}';
ALTER TABLE rooms ADD COLUMN slow_mode INTEGER NOT NULL DEFAULT 0;

CREATE TABLE moderation_log (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    room       TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    user_name  TEXT,
    by_name    TEXT    NOT NULL,
    reason     TEXT    NOT NULL DEFAULT '',
    until_ms   INTEGER,
    slow_mode  INTEGER,
    created_ms INTEGER NOT NULL
);
CREATE INDEX moderation_log_room ON moderation_log (room, id);
