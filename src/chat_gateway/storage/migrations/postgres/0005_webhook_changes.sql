-- Edits and deletes have webhook events too (message.updated, message.deleted),
-- queued with a room's message.created events in commit order. pos is the room's
-- commit position: a message's seq plus the room's change count at its commit, a
-- change's after_seq plus its change number. Each commit raises one of the two
-- counters by one, so pos grows by one per event of the room, whatever its kind.
-- Rows written before hold their seq (no change event was written then).
ALTER TABLE webhook_outbox ADD COLUMN pos bigint;
UPDATE webhook_outbox SET pos = seq;
ALTER TABLE webhook_outbox ALTER COLUMN pos SET NOT NULL;

-- The queue of one receiver and room, in commit order: its head is the next to send.
DROP INDEX webhook_outbox_pending;
CREATE INDEX webhook_outbox_pending ON webhook_outbox (endpoint_id, room, pos)
    WHERE state = 0;
