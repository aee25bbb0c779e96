-- Replies and mentions. A reply names its parent's seq (same room); the parent
-- keeps its thread summary (JSON, read with the row as reactions are); a thread
-- change is logged with kind 'thread'. Mentions: the user ids a message names (JSON
-- on the row, for the message's JSON) and one row per mentioned user, which the
-- unread-mention counts of GET /v1/read read by (user, room, seq).
ALTER TABLE messages ADD COLUMN reply_to bigint;
ALTER TABLE messages ADD COLUMN mentions text;
ALTER TABLE messages ADD COLUMN thread   text;

CREATE INDEX messages_replies ON messages (room, reply_to, seq) WHERE reply_to IS NOT NULL;

CREATE TABLE mentions (
    user_name text   NOT NULL,
    room      text   NOT NULL,
    seq       bigint NOT NULL,
    PRIMARY KEY (user_name, room, seq)
);
CREATE INDEX mentions_message ON mentions (room, seq);
