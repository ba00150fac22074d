//! Every statement the store runs, next to the schema in `migrations/`. All values are bound
//! parameters; the only statement text built at run time is the number of `VALUES` rows of a
//! batch insert ([`insert_rows`]).

/// The columns of a full read, in the order [`crate::row::recorded`] decodes them.
macro_rules! columns {
    () => {
        "position, stream_type, stream_id, stream_version, event_id, event_type, schema_version, \
         payload, metadata, recorded_at"
    };
}

macro_rules! insert_guarded {
    () => {
        "INSERT INTO events (stream_type, stream_id, stream_version, event_id, event_type, \
         schema_version, payload, metadata, recorded_at) \
         SELECT ?1, ?2, cur.v + 1, ?6, ?7, ?8, ?9, ?10, ?3 \
         FROM (SELECT coalesce(max(stream_version), 0) AS v FROM (SELECT stream_version \
         FROM events WHERE stream_type = ?1 AND stream_id = ?2 \
         ORDER BY stream_version DESC LIMIT 1)) AS cur \
         WHERE CASE ?4 WHEN 0 THEN 1 WHEN 1 THEN cur.v = 0 WHEN 2 THEN cur.v > 0 ELSE cur.v = ?5 END"
    };
}

/// The stream's version: the unique index on `(stream_type, stream_id, stream_version)` answers it.
pub const STREAM_VERSION: &str = "SELECT coalesce(max(stream_version), 0) FROM events \
     WHERE stream_type = ?1 AND stream_id = ?2";

/// Rows per insert statement: at 5 parameters a row (and 5 for the statement), well below
/// SQLite's limit of 32,766 bound parameters.
pub const MAX_ROWS_PER_INSERT: usize = 500;

/// How [`INSERT_GUARDED`]'s `?4` encodes the expected version (`?5` is the exact version).
pub mod expect {
    pub const ANY: i64 = 0;
    pub const NO_STREAM: i64 = 1;
    pub const STREAM_EXISTS: i64 = 2;
    pub const EXACT: i64 = 3;
}

/// The insert of a one-event append: the event at the version that follows the stream's current
/// one, if the stream meets the expectation (`?4`, one of [`expect`]; `?5` the exact version),
/// otherwise no row at all. Reading the version and inserting are one statement, so nothing can
/// write between them, and a stream that does not meet the expectation costs no other statement.
/// `?1`, `?2`: the stream; `?3`: `recorded_at`; `?6` to `?10`: the event's `event_id, event_type,
/// schema_version, payload, metadata`. The event is bound as scalars, not as a one-row `VALUES`
/// list: a list would cost SQLite a coroutine and a sorter per append. [`INSERT_GUARDED_RETURNING`]
/// returns the stored row's `stream_version, position` (for an expectation that does not pin the
/// version).
///
/// Batches of several events use [`insert_rows`] instead: because this statement reads the table
/// it inserts into, a `VALUES` list of several rows would be materialized, sorted and copied into
/// a temporary table first, copies of every payload that a plain insert does not make.
///
/// The version is the stream's last index entry (`ORDER BY … DESC LIMIT 1`, one seek): SQLite
/// answers a bare `max()` with one seek only in a top-level query ([`STREAM_VERSION`]), and in
/// this derived table it would walk every entry of the stream, a cost that grows with the
/// stream's length on every append.
pub const INSERT_GUARDED: &str = insert_guarded!();

/// [`INSERT_GUARDED`], returning the stored row's `stream_version, position`.
pub const INSERT_GUARDED_RETURNING: &str =
    concat!(insert_guarded!(), " RETURNING stream_version, position");

/// A plain insert of `rows` events, for a write transaction that has read and checked the
/// stream's version itself: each row binds `stream_type, stream_id, stream_version, event_id,
/// event_type, schema_version, payload, metadata, recorded_at`, in that order. Rows are inserted
/// in `VALUES` order, so their keys (positions) ascend with their versions.
///
/// The parameters are anonymous (`?`), never numbered (`?NNN`): the driver asks SQLite for every
/// parameter's name before binding it, and SQLite finds a numbered parameter's name by a linear
/// search of the statement's names, which makes binding a statement of n numbered parameters
/// cost n² steps. Anonymous parameters have no names to search.
pub fn insert_rows(rows: usize) -> String {
    const ROW: &str = "(?, ?, ?, ?, ?, ?, ?, ?, ?)";
    let mut sql = String::with_capacity(160 + rows * (ROW.len() + 2));
    sql.push_str(
        "INSERT INTO events (stream_type, stream_id, stream_version, event_id, event_type, \
         schema_version, payload, metadata, recorded_at) VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push_str(ROW);
    }
    sql
}

/// Where stored ids are (for idempotent retries): `?1` is a JSON array of hex-encoded ids.
pub const FIND_IDS: &str = "SELECT position, event_id, stream_type, stream_id, stream_version \
     FROM events WHERE event_id IN (SELECT unhex(value) FROM json_each(?1))";

/// One event by its id (the unique event-id index).
pub const FIND_EVENT: &str = concat!("SELECT ", columns!(), " FROM events WHERE event_id = ?1");

pub const READ_STREAM: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM events WHERE stream_type = ?1 AND stream_id = ?2 AND stream_version >= ?3 \
     ORDER BY stream_version LIMIT ?4"
);

/// A stream's events in a version range (inclusive), for inline projections.
pub const READ_BACK: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM events WHERE stream_type = ?1 AND stream_id = ?2 AND stream_version BETWEEN ?3 AND ?4 \
     ORDER BY stream_version"
);

pub const READ_ALL: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM events WHERE position >= ?1 ORDER BY position LIMIT ?2"
);

/// `?3` is a JSON array of type names.
pub const READ_ALL_FILTERED: &str = concat!(
    "SELECT ",
    columns!(),
    " FROM events WHERE position >= ?1 \
     AND event_type IN (SELECT value FROM json_each(?3)) ORDER BY position LIMIT ?2"
);

pub const HEAD: &str = "SELECT max(position) FROM events";

/// Events with `?1 <= position <= ?2`.
pub const COUNT: &str = "SELECT count(*) FROM events WHERE position BETWEEN ?1 AND ?2";

/// The same, of the types in the JSON array `?3`.
pub const COUNT_FILTERED: &str = "SELECT count(*) FROM events WHERE position BETWEEN ?1 AND ?2 \
     AND event_type IN (SELECT value FROM json_each(?3))";

pub const LOAD_SNAPSHOT: &str = "SELECT stream_version, snapshot_version, payload FROM snapshots \
     WHERE stream_type = ?1 AND stream_id = ?2";

/// Never replaces a newer snapshot with an older one.
pub const SAVE_SNAPSHOT: &str = "INSERT INTO snapshots \
     (stream_type, stream_id, stream_version, snapshot_version, payload, taken_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6) \
     ON CONFLICT (stream_type, stream_id) DO UPDATE \
     SET stream_version = excluded.stream_version, snapshot_version = excluded.snapshot_version, \
         payload = excluded.payload, taken_at = excluded.taken_at \
     WHERE snapshots.stream_version <= excluded.stream_version";

pub const LOAD_CHECKPOINT: &str = "SELECT tx, position FROM checkpoints WHERE name = ?1";

/// Creates a checkpoint that does not exist yet (0 rows: it does).
pub const INSERT_CHECKPOINT: &str = "INSERT INTO checkpoints (name, tx, position, updated_at) \
     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (name) DO NOTHING";

/// Compare-and-set (0 rows: it moved).
pub const UPDATE_CHECKPOINT: &str =
    "UPDATE checkpoints SET tx = ?2, position = ?3, updated_at = ?4 \
     WHERE name = ?1 AND tx = ?5 AND position = ?6";

pub const DELETE_CHECKPOINT: &str = "DELETE FROM checkpoints WHERE name = ?1";

/// Sets a checkpoint whatever it was (a blue/green switch, inside its transaction).
pub const SET_CHECKPOINT: &str = "INSERT INTO checkpoints (name, tx, position, updated_at) \
     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (name) DO UPDATE \
     SET tx = excluded.tx, position = excluded.position, updated_at = excluded.updated_at";

/// The skipped event's id and type come from its row: a row whose payload cannot be decoded
/// still has them.
/// A blue/green switch (`?1` the live name, `?2` the built one): the replaced version's skips go,
/// then the built version's take the live name.
pub const DROP_SKIPS: &str = "DELETE FROM projection_skips WHERE projection = ?1";
pub const RENAME_SKIPS: &str = "UPDATE projection_skips SET projection = ?1 WHERE projection = ?2";

pub const RECORD_SKIP: &str = "INSERT INTO projection_skips \
     (projection, tx, position, event_id, event_type, reason, skipped_at) \
     SELECT ?1, ?2, position, event_id, event_type, ?4, ?5 FROM events WHERE position = ?3";

/// A read file fed from another event store: the event's id and type come from the runner. An
/// unknown id is stored as an empty blob and an unknown type as `''` (no event type is empty).
pub const RECORD_SKIP_GIVEN: &str = "INSERT INTO projection_skips \
     (projection, tx, position, event_id, event_type, reason, skipped_at) \
     VALUES (?1, ?2, ?3, ?6, ?7, ?4, ?5)";

pub const SKIPPED: &str = "SELECT projection, tx, position, event_type, reason \
     FROM projection_skips WHERE projection = ?1 ORDER BY tx, position";

/// Records (or replaces) a projection's last failure.
pub const RECORD_FAILURE: &str = "INSERT INTO projection_failures \
     (projection, cause, tx, position, event_type, message, failed_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
     ON CONFLICT (projection) DO UPDATE SET cause = excluded.cause, tx = excluded.tx, \
     position = excluded.position, event_type = excluded.event_type, \
     message = excluded.message, failed_at = excluded.failed_at";

pub const CLEAR_FAILURE: &str = "DELETE FROM projection_failures WHERE projection = ?1";

pub const LAST_FAILURE: &str = "SELECT cause, tx, position, event_type, message, failed_at \
     FROM projection_failures WHERE projection = ?1";

pub const FIRST_DELIVERY: &str = "INSERT INTO processed_events (consumer, event_id, processed_at) \
     VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING";

/// Changes whenever another connection (in any process) commits to the file.
pub const DATA_VERSION: &str = "PRAGMA data_version";

/// Every stream type with its stream and event counts (a scan of the log: for operators).
pub const STREAM_TYPES: &str = "SELECT stream_type, count(DISTINCT stream_id), count(*) \
     FROM events GROUP BY stream_type ORDER BY stream_type";

/// Streams of type `?1` whose id sorts after `?2` (SQLite compares TEXT bytewise), `?3` at most.
pub const LIST_STREAMS: &str = "SELECT stream_id, max(stream_version), max(recorded_at) \
     FROM events WHERE stream_type = ?1 AND stream_id > ?2 \
     GROUP BY stream_id ORDER BY stream_id LIMIT ?3";

/// Every checkpoint, by name.
pub const LIST_CHECKPOINTS: &str =
    "SELECT name, tx, position, updated_at FROM checkpoints ORDER BY name";
