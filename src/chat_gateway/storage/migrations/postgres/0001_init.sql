-- Rooms carry their last assigned seq; the row lock taken by the increment
-- serialises writers of one room and nobody else.
CREATE TABLE rooms (
    room     text PRIMARY KEY,
    last_seq bigint NOT NULL
);

CREATE TABLE messages (
    room            text        NOT NULL,
    seq             bigint      NOT NULL,
    id              text        NOT NULL,
    author          text        NOT NULL,
    text            text        NOT NULL,
    created_at      timestamptz NOT NULL,
    idempotency_key text,
    PRIMARY KEY (room, seq),
    UNIQUE (id)
);

CREATE UNIQUE INDEX messages_idempotency ON messages (room, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

CREATE INDEX messages_created_at ON messages (created_at);
