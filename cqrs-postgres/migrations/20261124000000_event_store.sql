-- The event store's tables. `PostgresStore::migrate` runs this with `search_path` set to the store's
-- schema only, so every unqualified name below is created in that schema.

-- The log. `position` is the global sequence (handed out at INSERT time); `tx` is the writing
-- transaction, so readers can order by (tx, position) and stop below the oldest running
-- transaction: an event that commits late can then never appear behind a reader's cursor.
CREATE TABLE events (
    position        bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tx              xid8        NOT NULL DEFAULT pg_current_xact_id(),
    stream_type     text        NOT NULL,
    stream_id       text        NOT NULL,
    stream_version  bigint      NOT NULL CONSTRAINT events_stream_version_positive CHECK (stream_version > 0),
    event_id        uuid        NOT NULL,
    event_type      text        NOT NULL,
    schema_version  integer     NOT NULL,
    payload         jsonb       NOT NULL,
    metadata        jsonb       NOT NULL,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    -- A re-sent event id is an idempotent retry (the store looks the ids up on this violation).
    CONSTRAINT events_event_id_key UNIQUE (event_id),
    -- Optimistic concurrency: the loser of a race on a stream version fails here.
    CONSTRAINT events_stream_version_key UNIQUE (stream_type, stream_id, stream_version)
);

-- Gap-free global reads: WHERE (tx, position) > cursor AND tx < horizon ORDER BY tx, position.
CREATE INDEX events_tx_position_idx ON events (tx, position);
-- The same, filtered by event type.
CREATE INDEX events_type_tx_position_idx ON events (event_type, tx, position);

-- Events are immutable. Statement-level, so even an UPDATE or DELETE matching no row is refused.
-- (A table owner can still disable triggers; revoke UPDATE, DELETE and TRUNCATE from the
-- application's role for a hard guarantee.)
CREATE FUNCTION events_are_immutable() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'events are immutable: % on %.% is not allowed', TG_OP, TG_TABLE_SCHEMA, TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation',
              HINT = 'correct history by appending a compensating event';
END
$$;

CREATE TRIGGER events_are_immutable
    BEFORE UPDATE OR DELETE OR TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION events_are_immutable();

-- The latest snapshot of each stream.
CREATE TABLE snapshots (
    stream_type      text        NOT NULL,
    stream_id        text        NOT NULL,
    stream_version   bigint      NOT NULL CHECK (stream_version >= 0),
    snapshot_version bigint      NOT NULL,
    payload          jsonb       NOT NULL,
    taken_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream_type, stream_id)
);

-- How far each projection has read the log; moved only by compare-and-set.
CREATE TABLE checkpoints (
    name       text        PRIMARY KEY,
    tx         xid8        NOT NULL,
    position   bigint      NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
