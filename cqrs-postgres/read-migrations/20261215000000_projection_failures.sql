-- Each projection's last failure (`ProjectionBackend::record_failure`): written by its runner
-- when it fails, deleted once it moves past, so an operator's tool in another process can show
-- it (`cqrs-admin projections`). Idempotent, like every migration here.
CREATE TABLE IF NOT EXISTS projection_failures (
    projection  text        PRIMARY KEY,
    -- `FailureCause::name`: handler, decode, panic, corrupt_event, store, unavailable.
    cause       text        NOT NULL,
    -- The failing event's position, when the failure belongs to one event.
    tx          xid8,
    position    bigint,
    event_type  text,
    message     text        NOT NULL,
    failed_at   timestamptz NOT NULL DEFAULT now(),
    CHECK ((tx IS NULL) = (position IS NULL))
);
