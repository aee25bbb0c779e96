ALTER TABLE rooms ADD COLUMN last_change INTEGER NOT NULL DEFAULT 0;

ALTER TABLE messages ADD COLUMN version    INTEGER NOT NULL DEFAULT 1;
ALTER TABLE messages ADD COLUMN edited_ms  INTEGER;
ALTER TABLE messages ADD COLUMN deleted_ms INTEGER;

CREATE TABLE message_changes (
    room      TEXT    NOT NULL,
    change    INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    after_seq INTEGER NOT NULL,
    key_owner       TEXT,
    idempotency_key TEXT,
    PRIMARY KEY (room, change)
);

CREATE UNIQUE INDEX message_changes_idempotency
    ON message_changes (room, key_owner, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE read_positions (
    user_name  TEXT    NOT NULL,
    room       TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    PRIMARY KEY (user_name, room)
);
