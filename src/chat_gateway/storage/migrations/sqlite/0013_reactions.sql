-- Reactions (see the Postgres migration of the same number).
CREATE TABLE reactions (
    id        INTEGER PRIMARY KEY,
    room      TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    reaction  TEXT    NOT NULL,
    user_name TEXT    NOT NULL
);

CREATE UNIQUE INDEX reactions_key ON reactions (room, seq, reaction, user_name);

ALTER TABLE messages ADD COLUMN reactions TEXT;
ALTER TABLE message_changes ADD COLUMN kind TEXT;
