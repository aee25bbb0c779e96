-- Full-text search, part one (in a transaction, and quick on any table): the
-- column the words are kept in, the function that makes them, the trigger that
-- keeps them on every insert and edit, and the procedure that fills the rows
-- already stored. Part two (0010_search_index.sql) fills them and builds the
-- index without locking writers out.
--
-- ADD COLUMN of a nullable column with no default touches no row: a lock for a
-- moment, not a rewrite of the table.
ALTER TABLE messages ADD COLUMN search tsvector;

-- The text-search configuration the words are made with (SEARCH_LANGUAGE; the
-- gateway changes it, and re-indexes, when the setting differs at start-up).
CREATE TABLE search_settings (
    language text NOT NULL
);
INSERT INTO search_settings (language) VALUES ('simple');

-- Letters and digits make words; everything else separates them (as SQLite's
-- unicode61 tokenizer does, so both stores find the same messages). The
-- configuration is a constant of the function: the gateway replaces the
-- function when SEARCH_LANGUAGE changes.
CREATE FUNCTION messages_search_vector(body text) RETURNS tsvector
    LANGUAGE sql IMMUTABLE PARALLEL SAFE
    AS $$ SELECT to_tsvector('simple'::regconfig, regexp_replace(body, '[^[:alnum:]]+', ' ', 'g')) $$;

CREATE FUNCTION messages_search_trigger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.search := messages_search_vector(NEW.text);
    RETURN NEW;
END
$$;

CREATE TRIGGER messages_search BEFORE INSERT OR UPDATE OF text ON messages
    FOR EACH ROW EXECUTE FUNCTION messages_search_trigger();

-- Fill the column of stored rows (every row with ``everything``, else those
-- still without it) in batches of ``batch`` rows in key order, committing each:
-- row locks on one batch at a time, never on the table. CALL it outside a
-- transaction block.
CREATE PROCEDURE messages_search_fill(batch integer, everything boolean)
LANGUAGE plpgsql AS $$
DECLARE
    last_room text := '';
    last_seq bigint := -1;
    next_room text;
    next_seq bigint;
BEGIN
    LOOP
        SELECT room, seq INTO next_room, next_seq FROM (
            SELECT room, seq FROM messages WHERE (room, seq) > (last_room, last_seq)
            ORDER BY room, seq LIMIT batch
        ) b ORDER BY room DESC, seq DESC LIMIT 1;
        EXIT WHEN next_room IS NULL;
        UPDATE messages SET search = messages_search_vector(text)
            WHERE (room, seq) > (last_room, last_seq) AND (room, seq) <= (next_room, next_seq)
              AND (everything OR search IS NULL);
        COMMIT;
        last_room := next_room;
        last_seq := next_seq;
    END LOOP;
END
$$;
