-- Versions: each edit keeps the text it replaces (the version the message had,
-- and when the edit was made). A delete, a purge and retention remove them with
-- the message.
CREATE TABLE message_versions (
    room      text        NOT NULL,
    seq       bigint      NOT NULL,
    version   integer     NOT NULL,
    text      text        NOT NULL,
    edited_at timestamptz NOT NULL,
    PRIMARY KEY (room, seq, version)
);
