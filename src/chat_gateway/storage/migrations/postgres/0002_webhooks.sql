-- Webhook receivers, one row per URL ever configured. A receiver that answered
-- 410 Gone is disabled here for every instance until an operator enables it.
CREATE TABLE webhook_endpoints (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    url             text        NOT NULL UNIQUE,
    disabled_at     timestamptz,
    disabled_reason text
);

-- The transactional outbox: one row per event and receiver, written by the
-- statement that commits the message. state: 0 pending, 1 delivered, 2 dead.
-- No foreign keys: a check per inserted row would lock the receiver's row.
CREATE TABLE webhook_outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    endpoint_id bigint      NOT NULL,
    event_id    text        NOT NULL,
    type        text        NOT NULL,
    room        text        NOT NULL,
    seq         bigint      NOT NULL,
    data        text        NOT NULL,
    created_at  timestamptz NOT NULL,
    state       smallint    NOT NULL DEFAULT 0,
    attempts    integer     NOT NULL DEFAULT 0,
    next_at     timestamptz NOT NULL,
    lease_until timestamptz,
    last_status integer,
    last_error  text,
    finished_at timestamptz
);

-- The queue of one receiver and room, in seq order: its head is the next to send.
CREATE INDEX webhook_outbox_pending ON webhook_outbox (endpoint_id, room, seq)
    WHERE state = 0;
CREATE INDEX webhook_outbox_dead ON webhook_outbox (id) WHERE state = 2;
CREATE INDEX webhook_outbox_created ON webhook_outbox (created_at);
