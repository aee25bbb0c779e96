-- State rooms (docs/API.md, "State rooms"): the latest JSON value per key of a room.
-- Each write takes the room's next seq from rooms.last_seq under the room's row
-- lock, as an append does, so a room's state writes and messages share one
-- counter and commit in seq order. A delete keeps the key as a tombstone
-- (value NULL, deleted) so a resume from an older seq learns of it; tombstones
-- older than STATE_TOMBSTONE_TTL are purged and the room's state_purged_seq
-- raised to the highest seq removed: a resume from below it gets a snapshot.
CREATE TABLE room_state (
    room       text        NOT NULL,
    key        text        NOT NULL,
    value      jsonb,
    seq        bigint      NOT NULL,
    updated_at timestamptz NOT NULL,
    deleted    boolean     NOT NULL DEFAULT false,
    PRIMARY KEY (room, key),
    CHECK (deleted = (value IS NULL))
);
CREATE INDEX room_state_seq ON room_state (room, seq);
CREATE INDEX room_state_tombstones ON room_state (updated_at) WHERE deleted;

ALTER TABLE rooms ADD COLUMN state_purged_seq bigint NOT NULL DEFAULT 0;

-- Set (value not NULL; JSON null is a value) or delete (value NULL) one key, as
-- the gateway's PUT and DELETE do (storage/postgres.py, _STATE_WRITE); returns
-- the seq the write took. Bad input raises 22023 (invalid_parameter_value) and
-- writes nothing. pg_notify wakes every instance at COMMIT (never after a
-- ROLLBACK), on the channel chat_post uses.
CREATE FUNCTION chat_write_state(room text, key text, value jsonb)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
DECLARE
    written_at timestamptz := date_trunc('milliseconds', clock_timestamp());
    taken      bigint;
BEGIN
    IF chat_write_state.room IS NULL
       OR chat_write_state.room !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$' THEN
        RAISE EXCEPTION 'chat_set_state: room must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,127}'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF chat_write_state.key IS NULL
       OR chat_write_state.key !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$' THEN
        RAISE EXCEPTION 'chat_set_state: key must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,127}'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF chat_write_state.value IS NOT NULL
       AND octet_length(chat_write_state.value::text) > 65536 THEN
        RAISE EXCEPTION 'chat_set_state: value must be at most 65536 bytes of JSON'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The room's row locked and its seq raised, as an append does.
    INSERT INTO rooms AS x (room, last_seq) VALUES (chat_write_state.room, 1)
        ON CONFLICT ON CONSTRAINT rooms_pkey DO UPDATE SET last_seq = x.last_seq + 1
        RETURNING x.last_seq INTO taken;
    INSERT INTO room_state AS s (room, key, value, seq, updated_at, deleted)
    VALUES (chat_write_state.room, chat_write_state.key, chat_write_state.value, taken,
            written_at, chat_write_state.value IS NULL)
    ON CONFLICT ON CONSTRAINT room_state_pkey DO UPDATE
        SET value = excluded.value, seq = excluded.seq, updated_at = excluded.updated_at,
            deleted = excluded.deleted;
    PERFORM pg_notify('chat_gateway_posted',
                      json_build_object('room', chat_write_state.room, 'seq', taken)::text);
    RETURN taken;
END
$$;

-- The backend's two calls: a NULL value is refused by chat_set_state (a delete is
-- chat_delete_state; the JSON value null is 'null'::jsonb).
CREATE FUNCTION chat_set_state(room text, key text, value jsonb)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
BEGIN
    IF chat_set_state.value IS NULL THEN
        RAISE EXCEPTION 'chat_set_state: value is NULL; use chat_delete_state(room, key), or ''null''::jsonb for JSON null'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN chat_write_state(chat_set_state.room, chat_set_state.key, chat_set_state.value);
END
$$;

CREATE FUNCTION chat_delete_state(room text, key text)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
BEGIN
    RETURN chat_write_state(chat_delete_state.room, chat_delete_state.key, NULL);
END
$$;

DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION chat_write_state(text, text, jsonb) SET search_path = %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION chat_set_state(text, text, jsonb) SET search_path = %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION chat_delete_state(text, text) SET search_path = %I, pg_temp',
                   current_schema());
END
$$;
REVOKE EXECUTE ON FUNCTION chat_write_state(text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chat_set_state(text, text, jsonb) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chat_delete_state(text, text) FROM PUBLIC;
