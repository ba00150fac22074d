//! Appending inside the writer's transaction: the expected version checked against the stream's
//! version read in the same transaction (nobody else can write between the two: the transaction
//! holds SQLite's write lock), idempotent retries resolved by the core, like every backend.

use cqrs_core::backend::{resolve_retry, validate_append};
use cqrs_core::{
    AppendResult, ConcurrencyError, ExpectedVersion, NewEvent, StoreError, StreamId, StreamVersion,
};
use sqlx::sqlite::SqliteConnection;

use crate::error::{is_unique_violation, Errors};
use crate::row::{position_of, stored_ref};
use crate::sql;

/// A validated batch, as the values the insert binds.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    pub ids: Vec<[u8; 16]>,
    pub types: Vec<String>,
    pub schema_versions: Vec<i64>,
    pub payloads: Vec<String>,
    pub metadata: Vec<String>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// The ids as a JSON array of hex strings, for `sql::FIND_IDS`.
    fn ids_json(&self) -> String {
        let hex: Vec<String> = self
            .ids
            .iter()
            .map(|id| uuid::Uuid::from_bytes(*id).simple().to_string())
            .collect();
        serde_json::Value::from(hex).to_string()
    }
}

/// Validates a batch (the core's checks) and encodes it.
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
        encoded.ids.push(*event.event_id.as_uuid().as_bytes());
        encoded.types.push(event.event_type.clone());
        encoded
            .schema_versions
            .push(i64::from(event.schema_version));
        encoded.payloads.push(event.payload.to_string());
        encoded.metadata.push(metadata);
    }
    Ok(encoded)
}

/// What an append did.
#[derive(Debug)]
pub(crate) struct Appended {
    pub result: AppendResult,
    /// `true`: written now. `false`: an idempotent retry of events stored earlier.
    pub fresh: bool,
}

pub(crate) async fn stream_version(
    conn: &mut SqliteConnection,
    errors: &Errors,
    stream: &StreamId,
) -> Result<StreamVersion, StoreError> {
    let version: i64 = sqlx::query_scalar(sql::STREAM_VERSION)
        .bind(stream.stream_type())
        .bind(stream.id())
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| errors.map(e))?;
    Ok(StreamVersion::new(
        u64::try_from(version).unwrap_or_default(),
    ))
}

fn meets(expected: ExpectedVersion, current: StreamVersion) -> bool {
    match expected {
        ExpectedVersion::Any => true,
        ExpectedVersion::NoStream => current == StreamVersion::INITIAL,
        ExpectedVersion::StreamExists => current != StreamVersion::INITIAL,
        ExpectedVersion::Exact(version) => current == version,
    }
}

/// The whole append on `conn`, which must be inside a write transaction (`BEGIN IMMEDIATE`).
/// On error nothing of this append is left in the transaction.
pub(crate) async fn append_on(
    conn: &mut SqliteConnection,
    errors: &Errors,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[NewEvent],
    batch: &Encoded,
) -> Result<Appended, StoreError> {
    let current = stream_version(conn, errors, stream).await?;
    let conflict = |actual| -> StoreError {
        ConcurrencyError {
            stream: stream.clone(),
            expected,
            actual,
        }
        .into()
    };
    // Stored ids win over the expectation: a retry returns the original result whatever it
    // expects now (the core's idempotency semantics).
    if !meets(expected, current) {
        return match retry_outcome(conn, errors, stream, events, batch).await? {
            Some(outcome) => replayed(outcome),
            None => Err(conflict(current)),
        };
    }
    // One INSERT statement undoes itself on a constraint violation (SQLite's default `ABORT`
    // resolution), so only a batch written in several statements needs a savepoint around them.
    let chunked = batch.len() > sql::MAX_ROWS_PER_INSERT;
    if chunked {
        sqlx::raw_sql("SAVEPOINT cqrs_insert")
            .execute(&mut *conn)
            .await
            .map_err(|e| errors.map(e))?;
    }
    match insert(conn, stream, current, batch).await {
        Ok(last_key) => {
            if chunked {
                sqlx::raw_sql("RELEASE cqrs_insert")
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| errors.map(e))?;
            }
            Ok(Appended {
                result: AppendResult {
                    stream_version: current.advance(batch.len() as u64),
                    position: position_of(last_key)?,
                },
                fresh: true,
            })
        }
        Err(error) => {
            // Undo the chunks already inserted before looking ids up: they are not stored.
            if chunked {
                sqlx::raw_sql("ROLLBACK TO cqrs_insert; RELEASE cqrs_insert")
                    .execute(&mut *conn)
                    .await
                    .map_err(|e| errors.map(e))?;
            }
            if !is_unique_violation(&error) {
                return Err(errors.map(error));
            }
            match retry_outcome(conn, errors, stream, events, batch).await? {
                Some(outcome) => replayed(outcome),
                // A version taken under our write lock: only a writer that bypasses this store
                // can do that. Report what the stream is at now.
                None => Err(conflict(stream_version(conn, errors, stream).await?)),
            }
        }
    }
}

fn replayed(outcome: Result<AppendResult, StoreError>) -> Result<Appended, StoreError> {
    outcome.map(|result| Appended {
        result,
        fresh: false,
    })
}

/// Inserts the batch at versions `current + 1 ..`, in statements of at most
/// [`sql::MAX_ROWS_PER_INSERT`] rows; returns the last row's key.
async fn insert(
    conn: &mut SqliteConnection,
    stream: &StreamId,
    current: StreamVersion,
    batch: &Encoded,
) -> Result<i64, sqlx::Error> {
    let recorded_at = crate::row::now_micros();
    let mut last_key = 0;
    let mut version = current;
    let mut start = 0;
    while start < batch.len() {
        let end = (start + sql::MAX_ROWS_PER_INSERT).min(batch.len());
        let statement = sql::insert_events(end - start);
        let mut query = sqlx::query(sqlx::AssertSqlSafe(statement));
        for i in start..end {
            version = version.next();
            // Versions above i64::MAX cannot occur: a stream would need that many rows.
            let v = i64::try_from(version.get()).unwrap_or(i64::MAX);
            query = query
                .bind(stream.stream_type())
                .bind(stream.id())
                .bind(v)
                .bind(&batch.ids[i][..])
                .bind(&batch.types[i])
                .bind(batch.schema_versions[i])
                .bind(&batch.payloads[i])
                .bind(&batch.metadata[i]);
            query = query.bind(recorded_at);
        }
        last_key = query.execute(&mut *conn).await?.last_insert_rowid();
        start = end;
    }
    Ok(last_key)
}

/// If some of the batch's ids are stored, the outcome of the retry (the original result, or an
/// idempotency conflict).
async fn retry_outcome(
    conn: &mut SqliteConnection,
    errors: &Errors,
    stream: &StreamId,
    events: &[NewEvent],
    batch: &Encoded,
) -> Result<Option<Result<AppendResult, StoreError>>, StoreError> {
    let rows = sqlx::query(sql::FIND_IDS)
        .bind(batch.ids_json())
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| errors.map(e))?;
    if rows.is_empty() {
        return Ok(None);
    }
    let stored = rows.iter().map(stored_ref).collect::<Result<Vec<_>, _>>()?;
    Ok(Some(resolve_retry(stream, events, &stored)))
}

/// Reads the events just appended (`count` of them, ending at `written`) back, for inline
/// projections.
pub(crate) async fn read_back(
    conn: &mut SqliteConnection,
    errors: &Errors,
    stream: &StreamId,
    written: &AppendResult,
    count: usize,
) -> Result<Vec<cqrs_core::RecordedEvent>, StoreError> {
    let last = written.stream_version.get();
    let first = last.saturating_sub(count as u64).saturating_add(1);
    let rows = sqlx::query(sql::READ_BACK)
        .bind(stream.stream_type())
        .bind(stream.id())
        .bind(crate::error::to_i64("stream version", first)?)
        .bind(crate::error::to_i64("stream version", last)?)
        .fetch_all(&mut *conn)
        .await
        .map_err(|e| errors.map(e))?;
    rows.iter().map(crate::row::recorded).collect()
}
