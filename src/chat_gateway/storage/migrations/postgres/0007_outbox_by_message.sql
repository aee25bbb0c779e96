-- A delete, a purge or retention scrubs the text from every webhook event of the
-- message it removes, in its own transaction: find them by message.
CREATE INDEX webhook_outbox_message ON webhook_outbox (room, seq);
