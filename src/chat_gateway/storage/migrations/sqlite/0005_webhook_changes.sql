-- Edits and deletes have webhook events too, queued with a room's message.created
-- events in commit order by pos: a message's seq plus the room's change count at
-- its commit, a change's after_seq plus its change number (see the Postgres file).
ALTER TABLE webhook_outbox ADD COLUMN pos INTEGER NOT NULL DEFAULT 0;
UPDATE webhook_outbox SET pos = seq;
DROP INDEX webhook_outbox_pending;
CREATE INDEX webhook_outbox_pending ON webhook_outbox (endpoint_id, room, pos) WHERE state = 0;
