-- Chat: edits and deletes (a second, contiguous counter of changes per room,
-- message seqs untouched), and each user's read position per room.
ALTER TABLE rooms ADD COLUMN last_change bigint NOT NULL DEFAULT 0;

ALTER TABLE messages ADD COLUMN version    integer NOT NULL DEFAULT 1;
ALTER TABLE messages ADD COLUMN edited_at  timestamptz;
ALTER TABLE messages ADD COLUMN deleted_at timestamptz;

-- One row per edit or delete: change numbers 1, 2, 3 … per room; after_seq is
-- the room's last_seq when it committed (the change sits after that message).
CREATE TABLE message_changes (
    room      text   NOT NULL,
    change    bigint NOT NULL,
    seq       bigint NOT NULL,
    after_seq bigint NOT NULL,
    -- An Idempotency-Key, scoped to the room and the identity that sent it.
    key_owner       text,
    idempotency_key text,
    PRIMARY KEY (room, change)
);

CREATE UNIQUE INDEX message_changes_idempotency
    ON message_changes (room, key_owner, idempotency_key) WHERE idempotency_key IS NOT NULL;

CREATE TABLE read_positions (
    user_name  text        NOT NULL,
    room       text        NOT NULL,
    seq        bigint      NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (user_name, room)
);
