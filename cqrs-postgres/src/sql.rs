//! Every statement the store runs, built once per schema.
//!
//! The only text spliced into a statement is the schema name, validated by [`validate_schema`] and
//! double-quoted; every value is a bound parameter.

use cqrs_core::stream::InvalidId;
use sqlx::{AssertSqlSafe, SqlSafeStr, SqlStr};

/// Longest schema name accepted: the notification channel `<schema>_events` must stay within
/// PostgreSQL's 63-byte identifier limit.
pub const MAX_SCHEMA_LEN: usize = 56;

/// The columns of a read, in the shape [`crate::row`] decodes. `tx` is aliased `tx_text`: an alias
/// named `tx` would capture `ORDER BY tx` (ordering by the text, not the column), and the read
/// would no longer use the `(tx, position)` primary key's order.
const COLUMNS: &str = "position, tx::text AS tx_text, stream_type, stream_id, stream_version, event_id, \
     event_type, schema_version, payload::text AS payload_text, metadata::text AS metadata_text, recorded_at";

/// What an aggregate's replay reads (`ReplayEvent`): no metadata, no stream id (the caller
/// knows it) and no position, which a long stream's load would transfer and convert for every
/// row only to drop.
const REPLAY_COLUMNS: &str =
    "stream_version, event_type, schema_version, payload::text AS payload_text, recorded_at";

/// The visibility horizon: every transaction with a smaller id has finished, and any transaction
/// that writes later gets a larger id, so nothing can ever appear below it behind a reader.
pub const HORIZON: &str = "pg_snapshot_xmin(pg_current_snapshot())";

/// Accepts `[a-z_][a-z0-9_]*`, at most [`MAX_SCHEMA_LEN`] bytes, and none of PostgreSQL's own
/// schemas: `pg_*` (`pg_catalog`, `pg_toast`, temporary schemas) and `information_schema`. The
/// store creates, migrates and writes into its schema; a system schema is never meant for that.
pub fn validate_schema(schema: &str) -> Result<(), InvalidId> {
    validate_identifier("schema name", schema)?;
    if schema == "information_schema" {
        return Err(InvalidId {
            what: "schema name",
            reason: format!("`{schema}` is reserved by PostgreSQL"),
        });
    }
    Ok(())
}

/// The rule for every name spliced into SQL (schema, view, table): `[a-z_][a-z0-9_]*`, at most
/// [`MAX_SCHEMA_LEN`] bytes, not `pg_*`. Such a name needs no escaping inside double quotes.
pub fn validate_identifier(what: &'static str, name: &str) -> Result<(), InvalidId> {
    let reason = if name.is_empty() || name.len() > MAX_SCHEMA_LEN {
        format!("must be 1 to {MAX_SCHEMA_LEN} bytes long")
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        "must match [a-z_][a-z0-9_]*".to_owned()
    } else if name.starts_with("pg_") {
        "names starting with `pg_` are reserved by PostgreSQL".to_owned()
    } else {
        return Ok(());
    };
    Err(InvalidId {
        what,
        reason: format!("`{name}` {reason}"),
    })
}

pub struct Statements {
    pub schema: String,
    /// `"schema"`, ready to splice.
    pub quoted: String,
    pub channel: String,
    /// One event, not notifying.
    pub append_one: SqlStr,
    /// One event, notifying.
    pub append_one_notify: SqlStr,
    /// A batch, not notifying.
    pub append_batch: SqlStr,
    /// A batch, notifying once (its last event).
    pub append_batch_notify: SqlStr,
    pub notify: SqlStr,
    pub append_many: SqlStr,
    pub append_many_notify: SqlStr,
    pub find_ids: SqlStr,
    pub read_stream: SqlStr,
    pub read_stream_for_replay: SqlStr,
    pub read_streams_for_replay: SqlStr,
    pub find_event: SqlStr,
    pub read_all: SqlStr,
    pub read_all_filtered: SqlStr,
    pub pending: SqlStr,
    pub pending_filtered: SqlStr,
    pub horizon: SqlStr,
    pub horizon_status: SqlStr,
    pub stream_version: SqlStr,
    pub head: SqlStr,
    pub committed_head: SqlStr,
    pub count_after: SqlStr,
    pub count_after_filtered: SqlStr,
    pub count_between: SqlStr,
    pub count_between_filtered: SqlStr,
    pub load_snapshot: SqlStr,
    pub save_snapshot: SqlStr,
    pub load_checkpoint: SqlStr,
    pub insert_checkpoint: SqlStr,
    pub update_checkpoint: SqlStr,
    pub delete_checkpoint: SqlStr,
    pub lock_checkpoint: SqlStr,
    pub set_checkpoint: SqlStr,
    pub record_skip: SqlStr,
    pub record_skip_given: SqlStr,
    pub skipped: SqlStr,
    pub hand_over_skips: SqlStr,
    pub record_failure: SqlStr,
    pub clear_failure: SqlStr,
    pub last_failure: SqlStr,
    pub first_delivery: SqlStr,
    pub try_lease: SqlStr,
    pub stream_types: SqlStr,
    pub list_streams: SqlStr,
    pub list_checkpoints: SqlStr,
    pub lease_holder: SqlStr,
    pub read_back: SqlStr,
}

fn sql(text: String) -> SqlStr {
    AssertSqlSafe(text).into_sql_str()
}

/// The expected-version guard shared by both append statements. `$expected` is the code from
/// [`crate::append::expected_code`]: `>= 0` exact, `-1` any, `-2` the stream must exist.
fn guard(expected: &str, version: &str) -> String {
    format!(
        "CASE WHEN {expected} >= 0 THEN {version} = {expected} \
              WHEN {expected} = -2 THEN {version} > 0 \
              ELSE true END"
    )
}

/// The stream's last event (its version and writing transaction) as `last`, `NULL` columns for a
/// new stream: `FROM (SELECT 1) AS one LEFT JOIN LATERAL (…) AS last ON true`.
fn last_event(events: &str) -> String {
    format!(
        "(SELECT 1) AS one LEFT JOIN LATERAL (
            SELECT stream_version, tx FROM {events}
            WHERE stream_type = $1 AND stream_id = $2
            ORDER BY stream_version DESC LIMIT 1
         ) AS last ON true"
    )
}

/// The appended rows' columns, one row per event; no row at all when the guard refused.
const APPENDED: &str = "RETURNING position, tx::text AS tx_text, stream_version";

/// One statement, one implicit transaction: read the stream's version, check the expectation,
/// insert the events with consecutive versions, return one row per event (none if the guard
/// refused). A racer that slips in between fails on the unique version index (23505), never
/// silently. A plain `INSERT … SELECT`, no CTE: a CTE costs PostgreSQL a materialization step per
/// append.
///
/// `tx` is this transaction's id, or the stream's previous event's `tx` if that is larger:
/// possible only when the caller's transaction (`append_in`) got its id before the previous
/// event's writer. Any value at or above the own id keeps reads gap-free (the row stays above the
/// horizon while this transaction runs), and this one keeps each stream's events in version order
/// in the global log.
///
/// `one`: a batch of one event, bound as scalars ($4…$8), which skips decoding five arrays and
/// the function scan; otherwise the batch is bound as arrays and unnested in order.
/// `notify`: the batch's last event (`$10`, its id, for a batch bound as arrays) also notifies
/// `$9` with its position: one notification per batch, sent on commit.
fn append(events: &str, one: bool, notify: bool) -> String {
    let last = last_event(events);
    let version = "COALESCE(last.stream_version, 0)";
    let guard = guard("$3", version);
    let (values, from) = if one {
        (
            format!("{version} + 1, $4, $5, $6, $7::json, $8::json"),
            String::new(),
        )
    } else {
        (
            format!("{version} + u.n, u.id, u.t, u.sv, u.p::json, u.m::json"),
            " CROSS JOIN UNNEST($4::uuid[], $5::text[], $6::int[], $7::text[], $8::text[])
                 WITH ORDINALITY AS u(id, t, sv, p, m, n)"
                .to_owned(),
        )
    };
    let order = if one { "" } else { " ORDER BY u.n" };
    let notify = match (notify, one) {
        (false, _) => "",
        (true, true) => ", pg_notify($9, tx::text || '.' || position)::text AS notified",
        (true, false) => {
            ", CASE WHEN event_id = $10 THEN pg_notify($9, tx::text || '.' || position)::text END AS notified"
        }
    };
    format!(
        "INSERT INTO {events}
            (tx, stream_type, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
         SELECT GREATEST(pg_current_xact_id(), last.tx), $1, $2, {values}
         FROM {last}{from}
         WHERE {guard}{order}
         {APPENDED}{notify}"
    )
}

/// Group commit: several batches, each for a different stream, in one statement and
/// transaction; one row per written event. A batch whose guard fails writes nothing
/// and returns no row (its caller then appends alone and learns why). Each event's
/// lookup sees the stream as before the statement, so a batch's events share one base.
///
/// The arrays go through a subquery the planner cannot flatten (`OFFSET 0`) so that no
/// plan knows their lengths: custom plans then cost what the generic plan costs,
/// PostgreSQL settles on the generic plan after five executions, and a group is not
/// planned afresh each time (planning a group costs more than executing it).
///
/// `notify`: the event whose id is `$10` (the group's last) also notifies `$11` with its
/// position, the group's newest. A group whose last member was refused notifies nothing, and its
/// rows carry no `notified` value.
fn append_many(events: &str, guard_many: &str, notify: bool) -> String {
    let notify = if notify {
        ", CASE WHEN event_id = $10 THEN pg_notify($11, tx::text || '.' || position)::text END AS notified"
    } else {
        ""
    };
    format!(
        "INSERT INTO {events}
            (stream_type, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
         SELECT u.st, u.sid, COALESCE(last.stream_version, 0) + u.k, u.id, u.t, u.sv, u.p::json, u.m::json
         FROM (SELECT $1::text[] AS st, $2::text[] AS sid, $3::bigint[] AS expected, $4::bigint[] AS k,
              $5::uuid[] AS id, $6::text[] AS t, $7::int[] AS sv, $8::text[] AS p, $9::text[] AS m
               OFFSET 0) AS a
         CROSS JOIN LATERAL UNNEST(a.st, a.sid, a.expected, a.k, a.id, a.t, a.sv, a.p, a.m)
             WITH ORDINALITY AS u(st, sid, expected, k, id, t, sv, p, m, n)
         LEFT JOIN LATERAL (
            SELECT stream_version FROM {events}
            WHERE stream_type = u.st AND stream_id = u.sid
            ORDER BY stream_version DESC LIMIT 1
         ) AS last ON true
         WHERE {guard_many}
         ORDER BY u.n
         RETURNING stream_type, stream_id, stream_version, position, tx::text AS tx_text{notify}"
    )
}

impl Statements {
    pub fn new(schema: &str) -> Self {
        let s = format!("\"{schema}\"");
        let events = format!("{s}.events");
        let guard_many = guard("u.expected", "COALESCE(last.stream_version, 0)");
        Self {
            schema: schema.to_owned(),
            channel: format!("{schema}_events"),
            append_one: sql(append(&events, true, false)),
            append_batch: sql(append(&events, false, false)),
            // Notifying variants: inside a caller's transaction (`append_in`) the store cannot see
            // the commit, so the statement notifies, and PostgreSQL delivers the notification when
            // the caller commits; alone, when the store's announcer picked this append to carry it.
            append_one_notify: sql(append(&events, true, true)),
            append_batch_notify: sql(append(&events, false, true)),
            append_many: sql(append_many(&events, &guard_many, false)),
            append_many_notify: sql(append_many(&events, &guard_many, true)),
            notify: sql("SELECT pg_notify($1, $2)".to_owned()),
            find_ids: sql(format!(
                "SELECT position, tx::text AS tx_text, event_id, stream_type, stream_id, stream_version
                 FROM {events} WHERE event_id = ANY($1)"
            )),
            find_event: sql(format!("SELECT {COLUMNS} FROM {events} WHERE event_id = $1")),
            read_stream: sql(format!(
                "SELECT {COLUMNS} FROM {events}
                 WHERE stream_type = $1 AND stream_id = $2 AND stream_version >= $3
                 ORDER BY stream_version LIMIT $4"
            )),
            read_stream_for_replay: sql(format!(
                "SELECT {REPLAY_COLUMNS} FROM {events}
                 WHERE stream_type = $1 AND stream_id = $2 AND stream_version >= $3
                 ORDER BY stream_version LIMIT $4"
            )),
            // A grouped load: each member's stream (`$1`-`$4`, one array element per member)
            // from its first version, at most its limit, with its ordinal (`n`, 1-based) last.
            // One index range scan per member. No overall ORDER BY (a sort of every row): the
            // reader puts each member's rows in version order itself.
            read_streams_for_replay: sql(format!(
                "SELECT e.*, r.n FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[])
                     WITH ORDINALITY AS r(st, sid, from_version, lim, n)
                 CROSS JOIN LATERAL (
                    SELECT {REPLAY_COLUMNS} FROM {events}
                    WHERE stream_type = r.st AND stream_id = r.sid AND stream_version >= r.from_version
                    ORDER BY stream_version LIMIT r.lim
                 ) e"
            )),
            read_all: sql(format!(
                "SELECT {COLUMNS} FROM {events}
                 WHERE (tx, position) > ($1::text::xid8, $2) AND tx < {HORIZON}
                 ORDER BY tx, position LIMIT $3"
            )),
            // One bounded index range scan per type on (event_type, tx, position), merged.
            read_all_filtered: sql(format!(
                "SELECT e.* FROM (SELECT DISTINCT name FROM UNNEST($1::text[]) AS t(name)) AS wanted
                 CROSS JOIN LATERAL (
                    SELECT {COLUMNS}, tx AS order_tx FROM {events}
                    WHERE event_type = wanted.name AND (tx, position) > ($2::text::xid8, $3) AND tx < {HORIZON}
                    ORDER BY tx, position LIMIT $4
                 ) e
                 ORDER BY e.order_tx, e.position LIMIT $4"
            )),
            // After a short read ending at the cursor: the newest transaction with events after
            // it (they were above the horizon when read, or committed since), and the horizon.
            pending: sql(format!(
                "SELECT tx::text AS tx_text, {HORIZON}::text AS horizon FROM {events}
                 WHERE (tx, position) > ($1::text::xid8, $2)
                 ORDER BY tx DESC, position DESC LIMIT 1"
            )),
            pending_filtered: sql(format!(
                "SELECT tx::text AS tx_text, {HORIZON}::text AS horizon FROM {events}
                 WHERE (tx, position) > ($2::text::xid8, $3) AND event_type = ANY($1)
                 ORDER BY tx DESC, position DESC LIMIT 1"
            )),
            horizon: sql(format!("SELECT {HORIZON}::text")),
            horizon_status: sql(format!(
                "WITH h AS (SELECT {HORIZON} AS xmin)
                 SELECT h.xmin::text AS xmin,
                        (SELECT count(*) FROM {events} WHERE tx >= h.xmin) AS waiting,
                        a.pid, a.datname, a.usename, a.application_name, a.state, a.xact_start,
                        p.gid, p.prepared
                 FROM h
                 LEFT JOIN LATERAL (
                    SELECT pid, datname::text, usename::text, application_name, state, xact_start
                    FROM pg_stat_activity WHERE backend_xid = h.xmin::xid
                    ORDER BY xact_start LIMIT 1
                 ) a ON true
                 LEFT JOIN LATERAL (
                    SELECT gid, prepared FROM pg_prepared_xacts WHERE transaction = h.xmin::xid LIMIT 1
                 ) p ON true"
            )),
            stream_version: sql(format!(
                "SELECT COALESCE(max(stream_version), 0)::bigint FROM {events}
                 WHERE stream_type = $1 AND stream_id = $2"
            )),
            head: sql(format!(
                "SELECT position, tx::text AS tx_text FROM {events} WHERE tx < {HORIZON}
                 ORDER BY tx DESC, position DESC LIMIT 1"
            )),
            // Every committed event, readable or still above the horizon.
            committed_head: sql(format!(
                "SELECT position, tx::text AS tx_text FROM {events}
                 ORDER BY tx DESC, position DESC LIMIT 1"
            )),
            count_after: sql(format!(
                "SELECT count(*) FROM {events}
                 WHERE (tx, position) > ($1::text::xid8, $2) AND tx < {HORIZON}"
            )),
            // `until` is at or before the head, so below the horizon: no horizon condition.
            count_between: sql(format!(
                "SELECT count(*) FROM {events}
                 WHERE (tx, position) > ($1::text::xid8, $2) AND (tx, position) <= ($3::text::xid8, $4)"
            )),
            count_between_filtered: sql(format!(
                "SELECT count(*) FROM {events}
                 WHERE event_type = ANY($1) AND (tx, position) > ($2::text::xid8, $3)
                   AND (tx, position) <= ($4::text::xid8, $5)"
            )),
            count_after_filtered: sql(format!(
                "SELECT count(*) FROM {events}
                 WHERE event_type = ANY($1) AND (tx, position) > ($2::text::xid8, $3) AND tx < {HORIZON}"
            )),
            load_snapshot: sql(format!(
                "SELECT stream_version, snapshot_version, payload::text AS payload_text FROM {s}.snapshots
                 WHERE stream_type = $1 AND stream_id = $2"
            )),
            // Never replaces a newer snapshot with an older one.
            save_snapshot: sql(format!(
                "INSERT INTO {s}.snapshots AS old (stream_type, stream_id, stream_version, snapshot_version, payload)
                 VALUES ($1, $2, $3, $4, $5::json)
                 ON CONFLICT (stream_type, stream_id) DO UPDATE
                 SET stream_version = EXCLUDED.stream_version, snapshot_version = EXCLUDED.snapshot_version,
                     payload = EXCLUDED.payload, taken_at = now()
                 WHERE old.stream_version <= EXCLUDED.stream_version"
            )),
            load_checkpoint: sql(format!(
                "SELECT tx::text AS tx_text, position FROM {s}.checkpoints WHERE name = $1"
            )),
            insert_checkpoint: sql(format!(
                "INSERT INTO {s}.checkpoints (name, tx, position) VALUES ($1, $2::text::xid8, $3)
                 ON CONFLICT (name) DO NOTHING"
            )),
            update_checkpoint: sql(format!(
                "UPDATE {s}.checkpoints SET tx = $2::text::xid8, position = $3, updated_at = now()
                 WHERE name = $1 AND tx = $4::text::xid8 AND position = $5"
            )),
            delete_checkpoint: sql(format!("DELETE FROM {s}.checkpoints WHERE name = $1")),
            // A blue/green switch: waits for a batch committing on the checkpoint, then holds it.
            lock_checkpoint: sql(format!(
                "SELECT tx::text AS tx_text, position FROM {s}.checkpoints WHERE name = $1 FOR UPDATE"
            )),
            set_checkpoint: sql(format!(
                "INSERT INTO {s}.checkpoints (name, tx, position) VALUES ($1, $2::text::xid8, $3)
                 ON CONFLICT (name) DO UPDATE
                 SET tx = EXCLUDED.tx, position = EXCLUDED.position, updated_at = now()"
            )),
            record_skip: sql(format!(
                "INSERT INTO {s}.projection_skips (projection, tx, position, event_id, event_type, reason)
                 SELECT $1, tx, position, event_id, event_type, $4 FROM {events}
                 WHERE tx = $2::text::xid8 AND position = $3"
            )),
            // A read database without the events: the event's id and type come from the runner.
            record_skip_given: sql(format!(
                "INSERT INTO {s}.projection_skips (projection, tx, position, event_id, event_type, reason)
                 VALUES ($1, $2::text::xid8, $3, $5, $6, $4)"
            )),
            // A blue/green switch: the built version's skips become the live name's, replacing
            // those of the version it replaces.
            hand_over_skips: sql(format!(
                "WITH dropped AS (DELETE FROM {s}.projection_skips WHERE projection = $1)
                 UPDATE {s}.projection_skips SET projection = $1 WHERE projection = $2"
            )),
            skipped: sql(format!(
                "SELECT projection, tx::text AS tx_text, position, event_type, reason
                 FROM {s}.projection_skips WHERE projection = $1 ORDER BY tx, position"
            )),
            // A projection's last failure (`ProjectionBackend::record_failure`).
            record_failure: sql(format!(
                "INSERT INTO {s}.projection_failures (projection, cause, tx, position, event_type, message)
                 VALUES ($1, $2, $3::text::xid8, $4, $5, $6)
                 ON CONFLICT (projection) DO UPDATE
                 SET cause = EXCLUDED.cause, tx = EXCLUDED.tx, position = EXCLUDED.position,
                     event_type = EXCLUDED.event_type, message = EXCLUDED.message, failed_at = now()"
            )),
            clear_failure: sql(format!(
                "DELETE FROM {s}.projection_failures WHERE projection = $1"
            )),
            last_failure: sql(format!(
                "SELECT cause, tx::text AS tx_text, position, event_type, message, failed_at
                 FROM {s}.projection_failures WHERE projection = $1"
            )),
            first_delivery: sql(format!(
                "INSERT INTO {s}.processed_events (consumer, event_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING"
            )),
            // Session-level, keyed by (schema, name): two stores in different schemas never share
            // a lease. A hash collision only makes two projections take turns; exactness rests on
            // the checkpoint's compare-and-set, not on the lock.
            try_lease: sql("SELECT pg_try_advisory_lock(hashtext($1), hashtext($2))".to_owned()),
            // Operators' listings (`StoreAdmin`). Stream ids compare in byte order (`COLLATE "C"`)
            // whatever the database's collation, so every backend pages the same way.
            stream_types: sql(format!(
                "SELECT stream_type, count(DISTINCT stream_id), count(*) FROM {events}
                 GROUP BY stream_type ORDER BY stream_type COLLATE \"C\""
            )),
            list_streams: sql(format!(
                "SELECT stream_id, max(stream_version), max(recorded_at) FROM {events}
                 WHERE stream_type = $1 AND stream_id COLLATE \"C\" > $2 COLLATE \"C\"
                 GROUP BY stream_id ORDER BY stream_id COLLATE \"C\" LIMIT $3"
            )),
            list_checkpoints: sql(format!(
                "SELECT name, tx::text AS tx_text, position, updated_at FROM {s}.checkpoints
                 ORDER BY name COLLATE \"C\""
            )),
            // The session holding the advisory lock `try_lease` takes: a two-key advisory lock
            // shows its keys as `classid` and `objid` (the int4 bits as an oid), `objsubid` 2.
            lease_holder: sql(
                "SELECT l.pid, a.application_name, a.client_addr::text, a.usename::text, a.backend_start
                 FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
                 WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
                   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND l.classid = (hashtext($1)::bigint & 4294967295)::oid
                   AND l.objid = (hashtext($2)::bigint & 4294967295)::oid
                 LIMIT 1"
                    .to_owned(),
            ),
            // The events this transaction just appended (inline projections), in version order.
            read_back: sql(format!(
                "SELECT {COLUMNS} FROM {events}
                 WHERE stream_type = $1 AND stream_id = $2 AND stream_version > $3 AND stream_version <= $4
                 ORDER BY stream_version"
            )),
            quoted: s,
        }
    }
}
