-- Posting from SQL: a backend calls chat_post inside its own transaction, so its
-- message commits (or rolls back) with the backend's own writes, with no second
-- write to keep in step (docs/backends.md). The function does what the gateway's
-- append statement does (storage/postgres.py, _APPEND and with_outbox): the room's
-- row locked and its last_seq raised, the message inserted with that seq, a
-- banned or muted author refused under the lock, and one message.created outbox
-- row per webhook receiver in use. pg_notify wakes every instance at COMMIT (never
-- after a ROLLBACK); each one that holds the room fills it from the store.

-- The receivers the gateway writes outbox rows for (WEBHOOK_URLS as last
-- registered: an instance's start marks its list in use and every other URL not).
ALTER TABLE webhook_endpoints ADD COLUMN in_use boolean NOT NULL DEFAULT false;

-- A ULID, as the gateway's new_id makes them: 48 bits of milliseconds, then 80
-- random bits (the first 48 and 32 bits of two version-4 UUIDs, all random), in
-- Crockford's base32.
CREATE FUNCTION chat_new_id(ms bigint) RETURNS text
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    bits bit(130) := B'00' || substring(ms::bit(64) FROM 17 FOR 48)
        || substring(('x' || replace(gen_random_uuid()::text, '-', ''))::bit(128) FROM 1 FOR 48)
        || substring(('x' || replace(gen_random_uuid()::text, '-', ''))::bit(128) FROM 1 FOR 32);
    id text := '';
BEGIN
    FOR i IN 0..25 LOOP
        id := id || substr('0123456789ABCDEFGHJKMNPQRSTVWXYZ',
                           substring(bits FROM i * 5 + 1 FOR 5)::integer + 1, 1);
    END LOOP;
    RETURN id;
END
$$;

-- Post a message as ``author`` in ``room``; returns its seq. With an idempotency
-- key, a second call with the same key (per room and calling role) returns the
-- first call's seq and writes nothing. Bad input raises 22023
-- (invalid_parameter_value); a banned or muted author raises 42501
-- (insufficient_privilege); either way nothing is written.
CREATE FUNCTION chat_post(room text, author text, text text, idempotency_key text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER AS $$
DECLARE
    body    text := regexp_replace(text, '^[[:space:]]+|[[:space:]]+$', '', 'g');
    scoped  text;
    earlier bigint;
    r       rooms%ROWTYPE;
    at      timestamptz := date_trunc('milliseconds', clock_timestamp());
    m       messages%ROWTYPE;
BEGIN
    IF room IS NULL OR room !~ '^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$' THEN
        RAISE EXCEPTION 'chat_post: room must match [A-Za-z0-9][A-Za-z0-9_.:-]{0,127}'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF author IS NULL OR char_length(author) NOT BETWEEN 1 AND 64 OR author !~ '[^[:space:]]' THEN
        RAISE EXCEPTION 'chat_post: author must be 1..64 characters, not only whitespace'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF body IS NULL OR char_length(body) NOT BETWEEN 1 AND 4000 THEN
        RAISE EXCEPTION 'chat_post: text must be 1..4000 characters after trimming'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF idempotency_key IS NOT NULL THEN
        IF char_length(idempotency_key) NOT BETWEEN 1 AND 128
           OR idempotency_key !~ '[^[:space:]]' THEN
            RAISE EXCEPTION 'chat_post: idempotency_key must be 1..128 characters, not only whitespace'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        -- Scoped as the gateway scopes its callers' keys (delivery/publisher.py,
        -- scoped_key): by the kind of caller and its name, here the calling role.
        scoped := 'sql:' || char_length(session_user::text) || ':' || session_user::text
            || ':' || idempotency_key;
    END IF;

    -- The room's row, locked as an append locks it: posts to the room queue here.
    INSERT INTO rooms AS x (room, last_seq) VALUES (chat_post.room, 0) ON CONFLICT DO NOTHING;
    SELECT * INTO r FROM rooms AS x WHERE x.room = chat_post.room FOR UPDATE;
    IF scoped IS NOT NULL THEN
        SELECT seq INTO earlier FROM messages AS y
        WHERE y.room = chat_post.room AND y.idempotency_key = scoped;
        IF earlier IS NOT NULL THEN
            RETURN earlier;
        END IF;
    END IF;
    IF NOT chat_may_post(r.banned, r.muted, author) THEN
        RAISE EXCEPTION 'chat_post: % may not post in room % (banned or muted)', author, room
            USING ERRCODE = 'insufficient_privilege';
    END IF;

    UPDATE rooms AS x SET last_seq = x.last_seq + 1 WHERE x.room = chat_post.room
        RETURNING * INTO r;
    INSERT INTO messages AS y (room, seq, id, author, text, created_at, idempotency_key)
    VALUES (chat_post.room, r.last_seq,
            chat_new_id((extract(epoch FROM at) * 1000)::bigint), author, body, at, scoped)
    RETURNING * INTO m;

    INSERT INTO webhook_outbox (endpoint_id, event_id, type, room, seq, pos, data,
                                created_at, next_at)
    SELECT e.id, 'evt_' || m.id, 'message.created', m.room, m.seq, m.seq + r.last_change,
           json_build_object('id', m.id, 'room', m.room, 'seq', m.seq, 'author', m.author,
                             'text', m.text, 'created_at', to_char(m.created_at AT TIME ZONE
                             'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))::text,
           m.created_at, m.created_at
    FROM webhook_endpoints e WHERE e.in_use;

    PERFORM pg_notify('chat_gateway_posted', json_build_object('room', m.room, 'seq', m.seq)::text);
    RETURN m.seq;
END
$$;

-- A SECURITY DEFINER function resolves names in the schema the gateway's tables
-- were made in, never in one the caller controls; and only roles granted EXECUTE
-- may call it (functions are PUBLIC's to call unless revoked).
DO $$
BEGIN
    EXECUTE format('ALTER FUNCTION chat_post(text, text, text, text) SET search_path = %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION chat_new_id(bigint) SET search_path = %I, pg_temp',
                   current_schema());
END
$$;
REVOKE EXECUTE ON FUNCTION chat_post(text, text, text, text) FROM PUBLIC;
REVOKE EXECUTE ON FUNCTION chat_new_id(bigint) FROM PUBLIC;
