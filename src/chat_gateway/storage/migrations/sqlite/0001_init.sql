CREATE TABLE rooms (
    room     TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL
);

CREATE TABLE messages (
    room            TEXT    NOT NULL,
    seq             INTEGER NOT NULL,
    id              TEXT    NOT NULL UNIQUE,
    author          TEXT    NOT NULL,
    text            TEXT    NOT NULL,
    created_ms      INTEGER NOT NULL,
    idempotency_key TEXT,
    PRIMARY KEY (room, seq)
);

CREATE UNIQUE INDEX messages_idempotency ON messages (room, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE INDEX messages_created_ms ON messages (created_ms);
