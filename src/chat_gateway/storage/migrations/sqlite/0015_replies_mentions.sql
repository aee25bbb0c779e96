-- Replies and mentions (see the Postgres migration of the same number).
ALTER TABLE messages ADD COLUMN reply_to INTEGER;
ALTER TABLE messages ADD COLUMN mentions TEXT;
ALTER TABLE messages ADD COLUMN thread   TEXT;

CREATE INDEX messages_replies ON messages (room, reply_to, seq) WHERE reply_to IS NOT NULL;

CREATE TABLE mentions (
    user_name TEXT    NOT NULL,
    room      TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    PRIMARY KEY (user_name, room, seq)
);
CREATE INDEX mentions_message ON mentions (room, seq);
