//! Every statement the store runs, built once per schema. Values are always bound parameters; only
//! the validated schema identifier is quoted in.

const COLUMNS: &str = "position, tx::text AS tx_text, stream_type, stream_id, stream_version, event_id, \
     event_type, schema_version, payload::text AS payload_text, metadata::text AS metadata_text, recorded_at";

/// Visible to gap-free readers: written by a transaction older than every running one.
const BELOW_HORIZON: &str = "tx < pg_snapshot_xmin(pg_current_snapshot())";

pub struct Statements {
    pub schema: String,
    pub channel: String,
    pub migration: Vec<String>,
    pub append: String,
    pub find_ids: String,
    pub read_stream: String,
    pub read_all: String,
    pub read_all_filtered: String,
    pub stream_version: String,
    pub head: String,
    pub count_after: String,
    pub count_after_filtered: String,
    pub load_snapshot: String,
    pub save_snapshot: String,
    pub load_checkpoint: String,
    pub insert_checkpoint: String,
    pub update_checkpoint: String,
    pub delete_checkpoint: String,
}

impl Statements {
    pub fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        let events = format!("{s}.events");
        Self {
            schema: schema.to_owned(),
            channel: format!("{schema}_events"),
            migration: vec![
                format!("CREATE SCHEMA IF NOT EXISTS {s}"),
                format!(
                    "CREATE TABLE IF NOT EXISTS {events} (
                        position        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                        tx              xid8   NOT NULL DEFAULT pg_current_xact_id(),
                        stream_type     text   NOT NULL,
                        stream_id       text   NOT NULL,
                        stream_version  bigint NOT NULL CHECK (stream_version > 0),
                        event_id        uuid   NOT NULL UNIQUE,
                        event_type      text   NOT NULL,
                        schema_version  integer NOT NULL,
                        payload         jsonb  NOT NULL,
                        metadata        jsonb  NOT NULL,
                        recorded_at     timestamptz NOT NULL DEFAULT now(),
                        UNIQUE (stream_type, stream_id, stream_version)
                    )"
                ),
                format!("CREATE INDEX IF NOT EXISTS events_tx_position ON {events} (tx, position)"),
                format!("CREATE INDEX IF NOT EXISTS events_type_tx_position ON {events} (event_type, tx, position)"),
                format!(
                    "CREATE OR REPLACE FUNCTION {s}.events_are_immutable() RETURNS trigger LANGUAGE plpgsql AS
                     $$ BEGIN RAISE EXCEPTION 'events are immutable: % is not allowed', TG_OP; END $$"
                ),
                format!(
                    "CREATE OR REPLACE TRIGGER events_are_immutable BEFORE UPDATE OR DELETE ON {events}
                     FOR EACH ROW EXECUTE FUNCTION {s}.events_are_immutable()"
                ),
                format!(
                    "CREATE OR REPLACE TRIGGER events_no_truncate BEFORE TRUNCATE ON {events}
                     FOR EACH STATEMENT EXECUTE FUNCTION {s}.events_are_immutable()"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {s}.snapshots (
                        stream_type      text    NOT NULL,
                        stream_id        text    NOT NULL,
                        stream_version   bigint  NOT NULL,
                        snapshot_version integer NOT NULL,
                        payload          jsonb   NOT NULL,
                        PRIMARY KEY (stream_type, stream_id)
                    )"
                ),
                format!(
                    "CREATE TABLE IF NOT EXISTS {s}.checkpoints (
                        name       text PRIMARY KEY,
                        tx         bigint NOT NULL,
                        position   bigint NOT NULL,
                        updated_at timestamptz NOT NULL DEFAULT now()
                    )"
                ),
            ],
            // Guarded: inserts nothing unless the stream is at $3, so no gap can appear; the unique
            // index on the version rejects the loser of a race.
            append: format!(
                "INSERT INTO {events} (stream_type, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
                 SELECT $1, $2, u.v, u.id, u.t, u.sv, u.p::jsonb, u.m::jsonb
                 FROM UNNEST($4::bigint[], $5::uuid[], $6::text[], $7::int[], $8::text[], $9::text[]) AS u(v, id, t, sv, p, m)
                 WHERE (SELECT COALESCE(max(stream_version), 0) FROM {events} WHERE stream_type = $1 AND stream_id = $2) = $3
                 RETURNING position, tx::text AS tx_text"
            ),
            find_ids: format!(
                "SELECT position, tx::text AS tx_text, event_id, stream_type, stream_id, stream_version
                 FROM {events} WHERE event_id = ANY($1)"
            ),
            read_stream: format!(
                "SELECT {COLUMNS} FROM {events}
                 WHERE stream_type = $1 AND stream_id = $2 AND stream_version >= $3
                 ORDER BY stream_version LIMIT $4"
            ),
            read_all: format!(
                "SELECT {COLUMNS} FROM {events}
                 WHERE (tx, position) > ($1::text::xid8, $2) AND {BELOW_HORIZON}
                 ORDER BY tx, position LIMIT $3"
            ),
            read_all_filtered: format!(
                "SELECT {COLUMNS} FROM {events}
                 WHERE event_type = ANY($1) AND (tx, position) > ($2::text::xid8, $3) AND {BELOW_HORIZON}
                 ORDER BY tx, position LIMIT $4"
            ),
            stream_version: format!(
                "SELECT COALESCE(max(stream_version), 0)::bigint FROM {events} WHERE stream_type = $1 AND stream_id = $2"
            ),
            head: format!(
                "SELECT position, tx::text AS tx_text FROM {events} WHERE {BELOW_HORIZON}
                 ORDER BY tx DESC, position DESC LIMIT 1"
            ),
            count_after: format!(
                "SELECT count(*) FROM {events} WHERE (tx, position) > ($1::text::xid8, $2) AND {BELOW_HORIZON}"
            ),
            count_after_filtered: format!(
                "SELECT count(*) FROM {events}
                 WHERE event_type = ANY($1) AND (tx, position) > ($2::text::xid8, $3) AND {BELOW_HORIZON}"
            ),
            load_snapshot: format!(
                "SELECT stream_version, snapshot_version, payload::text AS payload_text FROM {s}.snapshots
                 WHERE stream_type = $1 AND stream_id = $2"
            ),
            save_snapshot: format!(
                "INSERT INTO {s}.snapshots AS old (stream_type, stream_id, stream_version, snapshot_version, payload)
                 VALUES ($1, $2, $3, $4, $5::jsonb)
                 ON CONFLICT (stream_type, stream_id) DO UPDATE
                 SET stream_version = EXCLUDED.stream_version, snapshot_version = EXCLUDED.snapshot_version, payload = EXCLUDED.payload
                 WHERE old.stream_version <= EXCLUDED.stream_version"
            ),
            load_checkpoint: format!("SELECT tx, position FROM {s}.checkpoints WHERE name = $1"),
            insert_checkpoint: format!(
                "INSERT INTO {s}.checkpoints (name, tx, position) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING"
            ),
            update_checkpoint: format!(
                "UPDATE {s}.checkpoints SET tx = $2, position = $3, updated_at = now()
                 WHERE name = $1 AND tx = $4 AND position = $5"
            ),
            delete_checkpoint: format!("DELETE FROM {s}.checkpoints WHERE name = $1"),
        }
    }
}
