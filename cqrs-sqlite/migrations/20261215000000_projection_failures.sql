-- Each projection's last failure (`ProjectionBackend::record_failure`): written by its runner
-- when it fails, deleted once it moves past, so an operator's tool in another process can show
-- it (`cqrs-admin projections`). Idempotent, like every migration here.
CREATE TABLE IF NOT EXISTS projection_failures (
    projection  TEXT    PRIMARY KEY,
    -- `FailureCause::name`: handler, decode, panic, corrupt_event, store, unavailable.
    cause       TEXT    NOT NULL,
    -- The failing event's position (both parts), when the failure belongs to one event.
    tx          INTEGER,
    position    INTEGER,
    event_type  TEXT,
    message     TEXT    NOT NULL,
    -- Microseconds since the Unix epoch, UTC.
    failed_at   INTEGER NOT NULL,
    CHECK ((tx IS NULL) = (position IS NULL))
) STRICT;
