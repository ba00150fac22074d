-- The event store's tables. Every statement is idempotent (`IF NOT EXISTS`): two processes that
-- open a new file at the same moment may both run it, and the loser's retry finds it applied.
-- STRICT tables: SQLite refuses a value of the wrong type instead of storing it as given.

-- The log. `position` is the global order. AUTOINCREMENT: a position is never handed out twice,
-- even after the last rows were removed (which the triggers below forbid anyway). Every write
-- transaction starts with BEGIN IMMEDIATE, so one writer at a time appends and commit order is
-- position order: the log is gap-free by construction.
CREATE TABLE IF NOT EXISTS events (
    position        INTEGER PRIMARY KEY AUTOINCREMENT,
    stream_type     TEXT    NOT NULL,
    stream_id       TEXT    NOT NULL,
    stream_version  INTEGER NOT NULL CHECK (stream_version > 0),
    -- The 16 bytes of the UUID. A re-sent id is an idempotent retry.
    event_id        BLOB    NOT NULL UNIQUE CHECK (length(event_id) = 16),
    event_type      TEXT    NOT NULL,
    schema_version  INTEGER NOT NULL,
    -- JSON text exactly as serde_json wrote it: SQLite never reinterprets it.
    payload         TEXT    NOT NULL,
    metadata        TEXT    NOT NULL,
    -- Microseconds since the Unix epoch, UTC; one value per append.
    recorded_at     INTEGER NOT NULL,
    -- Optimistic concurrency's backstop: two writers can never store the same version.
    UNIQUE (stream_type, stream_id, stream_version)
) STRICT;

-- Filtered global reads.
CREATE INDEX IF NOT EXISTS events_type_position ON events (event_type, position);

-- Events are immutable: correct history by appending a compensating event.
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are immutable: UPDATE on events is not allowed');
END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
BEGIN
    SELECT RAISE(ABORT, 'events are immutable: DELETE on events is not allowed');
END;

-- The latest snapshot of each stream.
CREATE TABLE IF NOT EXISTS snapshots (
    stream_type      TEXT    NOT NULL,
    stream_id        TEXT    NOT NULL,
    stream_version   INTEGER NOT NULL CHECK (stream_version >= 0),
    snapshot_version INTEGER NOT NULL,
    payload          TEXT    NOT NULL,
    taken_at         INTEGER NOT NULL,
    PRIMARY KEY (stream_type, stream_id)
) STRICT;

-- How far each projection has read the log; moved only by compare-and-set. Both parts of the
-- core's position are kept, so any position a caller saves reads back as given.
CREATE TABLE IF NOT EXISTS checkpoints (
    name       TEXT    PRIMARY KEY,
    tx         INTEGER NOT NULL,
    position   INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) STRICT;

-- Every event a user chose to skip (`ProjectionHandle::skip`), written in the transaction that
-- moves the checkpoint past it.
CREATE TABLE IF NOT EXISTS projection_skips (
    projection  TEXT    NOT NULL,
    tx          INTEGER NOT NULL,
    position    INTEGER NOT NULL,
    event_id    BLOB    NOT NULL,
    event_type  TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    skipped_at  INTEGER NOT NULL,
    PRIMARY KEY (projection, tx, position)
) STRICT;

-- Event ids already handled by a consumer with effects outside this file
-- (`SqliteProjections::first_delivery`): at-least-once delivery, de-duplicated by the consumer.
CREATE TABLE IF NOT EXISTS processed_events (
    consumer     TEXT    NOT NULL,
    event_id     BLOB    NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, event_id)
) STRICT;
