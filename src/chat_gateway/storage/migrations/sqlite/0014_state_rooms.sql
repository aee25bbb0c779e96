-- State rooms: the latest JSON value per key (see the Postgres migration 0014).
-- value holds the JSON text, NULL for a tombstone; seq is the room's seq the
-- key's last write took (rooms.last_seq, shared with messages).
CREATE TABLE room_state (
    room       TEXT    NOT NULL,
    key        TEXT    NOT NULL,
    value      TEXT,
    seq        INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (room, key)
);
CREATE INDEX room_state_seq ON room_state (room, seq);
CREATE INDEX room_state_tombstones ON room_state (updated_ms) WHERE value IS NULL;

ALTER TABLE rooms ADD COLUMN state_purged_seq INTEGER NOT NULL DEFAULT 0;
