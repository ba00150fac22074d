//! Appending: one statement per batch, the expected version checked in that statement and enforced
//! by the unique version index, idempotent retries resolved exactly like every other backend.

use cqrs_core::backend::{resolve_retry, validate_append};
use cqrs_core::{
    AppendResult, ConcurrencyError, ExpectedVersion, NewEvent, Position, StoreError, StreamId,
    StreamVersion,
};
use sqlx::postgres::PgConnection;
use sqlx::Row;
use uuid::Uuid;

use crate::error::{is_unique_violation, map_error_in, map_sent_write_error, out_of_range};
use crate::row::{parse_tx, stored_ref};
use crate::sql::Statements;

/// How often `Any`/`StreamExists` re-read the version after losing a race before giving up with a
/// [`ConcurrencyError`] (only reachable under extreme contention: in a caller's `REPEATABLE READ`
/// or `SERIALIZABLE` transaction, whose snapshot never sees the winner, the first lost race ends
/// in [`StoreError::StaleSnapshot`]).
const MAX_RACE_RETRIES: usize = 32;

/// A validated batch, as the columns the append statements bind.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    pub ids: Vec<Uuid>,
    pub types: Vec<String>,
    pub schema_versions: Vec<i32>,
    pub payloads: Vec<String>,
    pub metadata: Vec<String>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
}

/// Validates a batch (the core checks, then what PostgreSQL cannot store) and encodes it.
pub(crate) fn encode(stream: &StreamId, events: &[NewEvent]) -> Result<Encoded, StoreError> {
    validate_append(stream, events)?;
    let n = events.len();
    let mut encoded = Encoded {
        ids: Vec::with_capacity(n),
        types: Vec::with_capacity(n),
        schema_versions: Vec::with_capacity(n),
        payloads: Vec::with_capacity(n),
        metadata: Vec::with_capacity(n),
    };
    for event in events {
        let metadata =
            serde_json::to_string(&event.metadata).map_err(|e| StoreError::Backend(Box::new(e)))?;
        encoded.ids.push(*event.event_id.as_uuid());
        encoded.types.push(event.event_type.clone());
        encoded.schema_versions.push(
            i32::try_from(event.schema_version)
                .map_err(|_| out_of_range("schema version", event.schema_version))?,
        );
        encoded.payloads.push(event.payload.to_string());
        encoded.metadata.push(metadata);
    }
    Ok(encoded)
}

/// The expectation as the statements' `$3`: `>= 0` exact, `-1` any, `-2` the stream must exist.
pub(crate) fn expected_code(expected: ExpectedVersion) -> i64 {
    match expected {
        ExpectedVersion::Any => -1,
        ExpectedVersion::StreamExists => -2,
        ExpectedVersion::NoStream => 0,
        // Beyond i64::MAX no stream can be at that version: the guard fails, a conflict.
        ExpectedVersion::Exact(v) => i64::try_from(v.get()).unwrap_or(i64::MAX),
    }
}

pub(crate) fn to_version(version: i64) -> StreamVersion {
    StreamVersion::new(u64::try_from(version).unwrap_or_default())
}

/// What one attempt of the append statement did.
enum Attempt {
    Written(AppendResult),
    /// The guard refused: the stream was not at the expected version (the statement returned no
    /// row; the caller reads the actual version).
    Refused,
    /// A unique index refused: a stored event id or a racing writer.
    Duplicate,
}

fn inconsistent(inserted: usize, n: usize) -> StoreError {
    StoreError::Backend(
        format!("append wrote {inserted} of {n} events; the statement is inconsistent").into(),
    )
}

fn written(stream_version: i64, last: i64, tx: &str) -> Result<Attempt, StoreError> {
    let bad = |what: String| StoreError::Backend(what.into());
    Ok(Attempt::Written(AppendResult {
        stream_version: to_version(stream_version),
        position: Position::new(
            parse_tx(tx).map_err(bad)?,
            u64::try_from(last).map_err(|_| bad(format!("negative position {last}")))?,
        ),
    }))
}

/// The rows of [`crate::sql`]'s `append` statements (one per event, none if refused) into an
/// outcome.
fn appended_rows(rows: &[sqlx::postgres::PgRow], n: usize) -> Result<Attempt, StoreError> {
    let get = |row: &sqlx::postgres::PgRow, i: usize| -> Result<i64, StoreError> {
        row.try_get(i).map_err(crate::error::map_error)
    };
    let Some(last) = rows.last() else {
        return Ok(Attempt::Refused);
    };
    if rows.len() != n {
        return Err(inconsistent(rows.len(), n));
    }
    // Rows come back in insertion order: the last one has the highest position and version.
    let tx: &str = last.try_get(1).map_err(crate::error::map_error)?;
    written(get(last, 2)?, get(last, 0)?, tx)
}

const SAVEPOINT: &str = "SAVEPOINT cqrs_append";
const RELEASE: &str = "RELEASE SAVEPOINT cqrs_append";
const UNDO: &str = "ROLLBACK TO SAVEPOINT cqrs_append; RELEASE SAVEPOINT cqrs_append";

/// Where an append runs, and whether its statement notifies listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// In its own implicit transaction; the store announces it afterwards (coalesced).
    Alone,
    /// In its own implicit transaction, and the statement notifies (the store's announcer chose
    /// this append to carry the notification for its interval).
    AloneNotifying,
    /// In a caller's transaction, inside a savepoint so that a unique violation leaves that
    /// transaction usable; only the statement can notify, delivered on the caller's commit.
    InTransaction,
}

impl Mode {
    fn notifies(self) -> bool {
        self != Mode::Alone
    }
}

/// Runs the append statement once.
async fn attempt(
    conn: &mut PgConnection,
    sql: &Statements,
    stream: &StreamId,
    code: i64,
    batch: &Encoded,
    mode: Mode,
) -> Result<Attempt, StoreError> {
    let fail = |e| map_error_in(&sql.schema, e);
    let in_transaction = mode == Mode::InTransaction;
    if in_transaction {
        sqlx::raw_sql(SAVEPOINT)
            .execute(&mut *conn)
            .await
            .map_err(savepoint_error)?;
    }
    let single = match (
        &batch.ids[..],
        &batch.types[..],
        &batch.schema_versions[..],
        &batch.payloads[..],
        &batch.metadata[..],
    ) {
        ([id], [event_type], [schema_version], [payload], [metadata]) => {
            Some((id, event_type, schema_version, payload, metadata))
        }
        _ => None,
    };
    let statement = match (single.is_some(), mode.notifies()) {
        (true, false) => &sql.append_one,
        (true, true) => &sql.append_one_notify,
        (false, false) => &sql.append_batch,
        (false, true) => &sql.append_batch_notify,
    };
    let query = sqlx::query(statement.clone())
        .bind(stream.stream_type())
        .bind(stream.id())
        .bind(code);
    let query = match single {
        Some((id, event_type, schema_version, payload, metadata)) => query
            .bind(id)
            .bind(event_type)
            .bind(schema_version)
            .bind(payload)
            .bind(metadata),
        None => query
            .bind(&batch.ids)
            .bind(&batch.types)
            .bind(&batch.schema_versions)
            .bind(&batch.payloads)
            .bind(&batch.metadata),
    };
    // A notifying batch also names its last event, the one row that notifies.
    let query = match (mode.notifies(), single) {
        (false, _) => query,
        (true, Some(_)) => query.bind(&sql.channel),
        (true, None) => query.bind(&sql.channel).bind(batch.ids.last()),
    };
    let result = query
        .fetch_all(&mut *conn)
        .await
        .map(|rows| appended_rows(&rows, batch.len()));
    match result {
        Ok(outcome) => {
            if in_transaction {
                sqlx::raw_sql(RELEASE)
                    .execute(&mut *conn)
                    .await
                    .map_err(fail)?;
            }
            outcome
        }
        Err(error) => {
            if in_transaction && matches!(error, sqlx::Error::Database(_)) {
                sqlx::raw_sql(UNDO)
                    .execute(&mut *conn)
                    .await
                    .map_err(fail)?;
            }
            if is_unique_violation(&error) {
                Ok(Attempt::Duplicate)
            } else if in_transaction {
                // Nothing commits before the caller does; a lost connection took the caller's
                // transaction with it.
                Err(fail(error))
            } else {
                // The statement commits by itself: its reply, not its write, may be what was lost.
                Err(map_sent_write_error(error, fail))
            }
        }
    }
}

pub(crate) fn savepoint_error(error: sqlx::Error) -> StoreError {
    match &error {
        sqlx::Error::Database(db) if db.code().as_deref() == Some("25P01") => StoreError::Backend(
            "append_in needs a connection inside a transaction (call it on a `sqlx::Transaction`)"
                .into(),
        ),
        _ => crate::error::map_error(error),
    }
}

/// If some of the batch's ids are stored, the outcome of the retry (the original result, or an
/// idempotency conflict).
async fn retry_outcome(
    conn: &mut PgConnection,
    sql: &Statements,
    stream: &StreamId,
    events: &[NewEvent],
    batch: &Encoded,
) -> Result<Option<Result<AppendResult, StoreError>>, StoreError> {
    let rows = sqlx::query(sql.find_ids.clone())
        .bind(&batch.ids)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| map_error_in(&sql.schema, e))?;
    if rows.is_empty() {
        return Ok(None);
    }
    let stored = rows.iter().map(stored_ref).collect::<Result<Vec<_>, _>>()?;
    Ok(Some(resolve_retry(stream, events, &stored)))
}

pub(crate) async fn stream_version(
    conn: &mut PgConnection,
    sql: &Statements,
    stream: &StreamId,
) -> Result<StreamVersion, StoreError> {
    let version: i64 = sqlx::query_scalar(sql.stream_version.clone())
        .bind(stream.stream_type())
        .bind(stream.id())
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| map_error_in(&sql.schema, e))?;
    Ok(to_version(version))
}

/// For an append that conflicted (and is no idempotent retry): in a caller's transaction that
/// reads from one snapshot, the conflict may come from that snapshot rather than from the stream,
/// which [`StoreError::StaleSnapshot`] says. Asked on the conflict path only, so a successful
/// append pays no extra round trip.
async fn stale_snapshot(
    conn: &mut PgConnection,
    sql: &Statements,
    stream: &StreamId,
    expected: ExpectedVersion,
    mode: Mode,
) -> Result<Option<StoreError>, StoreError> {
    if mode != Mode::InTransaction || !snapshot_isolation(conn, sql).await? {
        return Ok(None);
    }
    Ok(Some(StoreError::StaleSnapshot {
        stream: stream.clone(),
        expected,
        snapshot_version: stream_version(conn, sql, stream).await?,
    }))
}

/// Whether the connection's transaction reads from one snapshot for its whole life
/// (`REPEATABLE READ`, `SERIALIZABLE`) instead of a new one per statement.
async fn snapshot_isolation(conn: &mut PgConnection, sql: &Statements) -> Result<bool, StoreError> {
    let isolation: String = sqlx::query_scalar("SELECT current_setting('transaction_isolation')")
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| map_error_in(&sql.schema, e))?;
    Ok(isolation != "read committed")
}

/// What an append did.
pub(crate) struct Appended {
    pub result: AppendResult,
    /// `true`: written now. `false`: an idempotent retry of events stored earlier.
    pub fresh: bool,
}

/// The whole append on one connection: attempt, then sort out refusals and unique violations.
pub(crate) async fn append_on(
    conn: &mut PgConnection,
    sql: &Statements,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[NewEvent],
    batch: &Encoded,
    mode: Mode,
) -> Result<Appended, StoreError> {
    let code = expected_code(expected);
    let replayed = |outcome: Result<AppendResult, StoreError>| {
        outcome.map(|result| Appended {
            result,
            fresh: false,
        })
    };
    let conflict = |actual| -> StoreError {
        ConcurrencyError {
            stream: stream.clone(),
            expected,
            actual,
        }
        .into()
    };
    let mut races = 0;
    loop {
        match attempt(conn, sql, stream, code, batch, mode).await? {
            Attempt::Written(result) => {
                return Ok(Appended {
                    result,
                    fresh: true,
                })
            }
            // Stored ids win over the expectation: a retry returns the original result whatever
            // it expects now (the core's idempotency semantics).
            Attempt::Refused => {
                if let Some(outcome) = retry_outcome(conn, sql, stream, events, batch).await? {
                    return replayed(outcome);
                }
                if let Some(stale) = stale_snapshot(conn, sql, stream, expected, mode).await? {
                    return Err(stale);
                }
                return Err(conflict(stream_version(conn, sql, stream).await?));
            }
            Attempt::Duplicate => {
                if let Some(outcome) = retry_outcome(conn, sql, stream, events, batch).await? {
                    return replayed(outcome);
                }
                // A row this snapshot cannot see holds one of our versions: re-reading in the
                // same snapshot would lose the same race every time.
                if let Some(stale) = stale_snapshot(conn, sql, stream, expected, mode).await? {
                    return Err(stale);
                }
                // A writer took one of our versions between our read and our insert.
                let retry = matches!(
                    expected,
                    ExpectedVersion::Any | ExpectedVersion::StreamExists
                );
                if retry && races < MAX_RACE_RETRIES {
                    races += 1;
                    tokio::task::yield_now().await;
                    continue;
                }
                return Err(conflict(stream_version(conn, sql, stream).await?));
            }
        }
    }
}
