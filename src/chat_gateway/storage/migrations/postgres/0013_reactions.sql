-- Reactions: one row per user and reaction on a message (a user's reaction is
-- there once), the summary kept on the message's row (history pages read it as
-- they read the text), and the change log's kind ('reactions' for a reactions
-- change; NULL for an edit or delete, told apart by the message).
CREATE TABLE reactions (
    room      text        NOT NULL,
    seq       bigint      NOT NULL,
    reaction  text        NOT NULL,
    user_name text        NOT NULL,
    id        bigserial   NOT NULL,
    PRIMARY KEY (room, seq, reaction, user_name)
);

ALTER TABLE messages ADD COLUMN reactions text;
ALTER TABLE message_changes ADD COLUMN kind text;
