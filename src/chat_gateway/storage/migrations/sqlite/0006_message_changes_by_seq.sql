-- Retention deletes a message's change rows with it: find them by message.
CREATE INDEX message_changes_by_seq ON message_changes (room, seq);
