-- Projections (`PostgresProjections`): what was skipped on request, and which events external
-- side effects have already handled.

-- Every event a user chose to skip (`ProjectionHandle::skip`), written in the transaction that
-- moves the checkpoint past it.
CREATE TABLE projection_skips (
    projection  text        NOT NULL,
    tx          xid8        NOT NULL,
    position    bigint      NOT NULL,
    event_id    uuid        NOT NULL,
    event_type  text        NOT NULL,
    reason      text        NOT NULL,
    skipped_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (projection, tx, position)
);

-- Event ids already handled by a consumer with effects outside this database (e-mail, HTTP, a
-- broker): `PostgresProjections::first_delivery` inserts here in the handler's transaction, so a
-- redelivered event is recognised. At-least-once delivery, de-duplicated by the consumer.
CREATE TABLE processed_events (
    consumer     text        NOT NULL,
    event_id     uuid        NOT NULL,
    processed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, event_id)
);
