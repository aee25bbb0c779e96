-- Full-text search: an external-content FTS5 table over messages.text, kept by
-- triggers in the writing transaction (an edit replaces the old words, a delete
-- empties them, a purge or retention delete removes them). unicode61 without
-- diacritic folding splits words as the Postgres store does (letters and
-- digits; everything else separates) and compares them without case.
CREATE VIRTUAL TABLE messages_fts USING fts5(
    text,
    content = 'messages',
    content_rowid = 'rowid',
    tokenize = 'unicode61 remove_diacritics 0'
);

CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
    INSERT INTO messages_fts (rowid, text) VALUES (new.rowid, new.text);
END;

CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
END;

CREATE TRIGGER messages_fts_update AFTER UPDATE OF text ON messages BEGIN
    INSERT INTO messages_fts (messages_fts, rowid, text) VALUES ('delete', old.rowid, old.text);
    INSERT INTO messages_fts (rowid, text) VALUES (new.rowid, new.text);
END;

-- The messages already stored.
INSERT INTO messages_fts (messages_fts) VALUES ('rebuild');

