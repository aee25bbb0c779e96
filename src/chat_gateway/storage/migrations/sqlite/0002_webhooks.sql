CREATE TABLE webhook_endpoints (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    url             TEXT    NOT NULL UNIQUE,
    disabled_ms     INTEGER,
    disabled_reason TEXT
);

-- state: 0 pending, 1 delivered, 2 dead. Times are epoch milliseconds.
CREATE TABLE webhook_outbox (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    endpoint_id INTEGER NOT NULL,
    event_id    TEXT    NOT NULL,
    type        TEXT    NOT NULL,
    room        TEXT    NOT NULL,
    seq         INTEGER NOT NULL,
    data        TEXT    NOT NULL,
    created_ms  INTEGER NOT NULL,
    state       INTEGER NOT NULL DEFAULT 0,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_ms     INTEGER NOT NULL,
    lease_ms    INTEGER,
    last_status INTEGER,
    last_error  TEXT,
    finished_ms INTEGER
);

CREATE INDEX webhook_outbox_pending ON webhook_outbox (endpoint_id, room, seq) WHERE state = 0;
CREATE INDEX webhook_outbox_dead ON webhook_outbox (id) WHERE state = 2;
CREATE INDEX webhook_outbox_created ON webhook_outbox (created_ms);
