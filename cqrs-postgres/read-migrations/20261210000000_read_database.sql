-- A read database's own tables (`PostgresProjections::with_event_source`, applied by
-- `PostgresProjections::migrate` with `search_path` set to the read schema only). The events live
-- in another store; these tables live with the read models, so losing the read database loses the
-- checkpoints with it and the projections rebuild instead of resuming on nothing.

-- How far each projection has read the event store's log; moved only by compare-and-set, in the
-- transaction that writes the batch's read-model rows.
CREATE TABLE IF NOT EXISTS checkpoints (
    name       text        PRIMARY KEY,
    tx         xid8        NOT NULL,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Events skipped on request. The event's id and type come from the runner, not from a row here:
-- they are unknown (NULL) when the event store could not read the event's row.
CREATE TABLE IF NOT EXISTS projection_skips (
    projection  text        NOT NULL,
    tx          xid8        NOT NULL,
    position    bigint      NOT NULL,
    event_id    uuid,
    event_type  text,
    reason      text        NOT NULL,
    skipped_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, tx, position)
);

-- Event ids already handled by a consumer with effects outside this database
-- (`PostgresProjections::first_delivery`).
CREATE TABLE IF NOT EXISTS processed_events (
    consumer     text        NOT NULL,
    event_id     uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
