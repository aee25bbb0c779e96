-- Versions (see the Postgres migration of the same number).
CREATE TABLE message_versions (
    room      TEXT    NOT NULL,
    seq       INTEGER NOT NULL,
    version   INTEGER NOT NULL,
    text      TEXT    NOT NULL,
    edited_ms INTEGER NOT NULL,
    PRIMARY KEY (room, seq, version)
);
