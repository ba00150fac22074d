//! Appending: for one event, one INSERT that reads the stream's version and inserts only if it
//! meets the expectation (nobody can write between the two: the statement holds SQLite's write
//! lock); for several, a version read and a plain INSERT in the write transaction;
//! when it stores nothing, stored ids are looked up first (idempotent retries, resolved by the
//! core like on every backend), then the conflict is reported.

use std::sync::Arc;

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
    // One INSERT statement undoes itself on a constraint violation (SQLite's default `ABORT`
    // resolution), so only a batch written in several statements needs a savepoint around them.
    let chunked = batch.len() > sql::MAX_ROWS_PER_INSERT;
    if chunked {
        sqlx::raw_sql("SAVEPOINT cqrs_insert")
            .execute(&mut *conn)
            .await
            .map_err(|e| errors.map(e))?;
    }
    let inserted = insert(conn, stream, expected, batch).await;
    if chunked {
        // Undo the chunks already inserted when a later one failed: they are not stored.
        let end = match inserted {
            Ok(Inserted::Stored { .. }) => "RELEASE cqrs_insert",
            _ => "ROLLBACK TO cqrs_insert; RELEASE cqrs_insert",
        };
        sqlx::raw_sql(end)
            .execute(&mut *conn)
            .await
            .map_err(|e| errors.map(e))?;
    }
    match inserted {
        Ok(Inserted::Stored { version, last_key }) => Ok(Appended {
            result: AppendResult {
                stream_version: version,
                position: position_of(last_key)?,
            },
            fresh: true,
        }),
        Ok(Inserted::Unmet) => rejected(conn, errors, stream, expected, events, batch).await,
        // A stored event id, or (only for a writer that bypasses this store) a version taken.
        Err(error) if is_unique_violation(&error) => {
            rejected(conn, errors, stream, expected, events, batch).await
        }
        Err(error) => Err(errors.map(error)),
    }
}

/// A lone append outside any transaction: one guarded INSERT in autocommit mode, which is a
/// write transaction of its own (SQLite takes the write lock when the statement starts, as
/// `BEGIN IMMEDIATE` would, so the version it reads cannot move before it inserts) and commits
/// when the statement ends. `Ok(None)`: nothing was stored (the stream did not meet the
/// expectation, or an id of the batch is stored), and only a transaction can tell a retry from a
/// conflict: run the append again with [`append_on`]. An error came from the statement, which
/// includes the commit. For one-event batches (a batch of several comes back as `Ok(None)`): a
/// batch of several is a version read and an insert (see [`insert`]), which need a transaction
/// around them.
pub(crate) async fn append_alone(
    conn: &mut SqliteConnection,
    stream: &StreamId,
    expected: ExpectedVersion,
    batch: &Encoded,
) -> Result<Option<Appended>, sqlx::Error> {
    if batch.len() != 1 {
        return Ok(None);
    }
    let recorded_at = crate::row::now_micros();
    match insert_guarded(conn, stream, expected, batch, recorded_at).await {
        Ok(Inserted::Stored { version, last_key }) => {
            let Ok(position) = position_of(last_key) else {
                return Err(sqlx::Error::Protocol(format!(
                    "SQLite returned the key {last_key}"
                )));
            };
            Ok(Some(Appended {
                result: AppendResult {
                    stream_version: version,
                    position,
                },
                fresh: true,
            }))
        }
        Ok(Inserted::Unmet) => Ok(None),
        Err(error) if is_unique_violation(&error) => Ok(None),
        Err(error) => Err(error),
    }
}

/// An append that stored nothing: the original result of a retry of stored events, or the
/// conflict. Stored ids win over the expectation (the core's idempotency semantics).
async fn rejected(
    conn: &mut SqliteConnection,
    errors: &Errors,
    stream: &StreamId,
    expected: ExpectedVersion,
    events: &[NewEvent],
    batch: &Encoded,
) -> Result<Appended, StoreError> {
    if let Some(outcome) = retry_outcome(conn, errors, stream, events, batch).await? {
        return outcome.map(|result| Appended {
            result,
            fresh: false,
        });
    }
    Err(ConcurrencyError {
        stream: stream.clone(),
        expected,
        actual: stream_version(conn, errors, stream).await?,
    }
    .into())
}

/// What a guarded insert did.
enum Inserted {
    /// Stored: the stream's version after it, and the last row's key.
    Stored {
        version: StreamVersion,
        last_key: i64,
    },
    /// The stream did not meet the expectation: nothing was inserted.
    Unmet,
}

/// Inserts the batch; `conn` is inside a write transaction. One event: the guarded statement.
/// Several: the stream's version is read and checked against `expected`, then the rows are
/// inserted at the versions that follow it with a plain `VALUES` list, in statements of at most
/// [`sql::MAX_ROWS_PER_INSERT`] rows (the transaction holds the write lock, so the version cannot
/// move in between; see [`sql::INSERT_GUARDED`] for why batches are not guarded in the insert).
async fn insert(
    conn: &mut SqliteConnection,
    stream: &StreamId,
    expected: ExpectedVersion,
    batch: &Encoded,
) -> Result<Inserted, sqlx::Error> {
    let recorded_at = crate::row::now_micros();
    if batch.len() == 1 {
        return insert_guarded(conn, stream, expected, batch, recorded_at).await;
    }
    let current: i64 = sqlx::query_scalar(sql::STREAM_VERSION)
        .bind(stream.stream_type())
        .bind(stream.id())
        .fetch_one(&mut *conn)
        .await?;
    let met = match expected {
        ExpectedVersion::Any => true,
        ExpectedVersion::NoStream => current == 0,
        ExpectedVersion::StreamExists => current > 0,
        ExpectedVersion::Exact(version) => i64::try_from(version.get()) == Ok(current),
    };
    if !met {
        return Ok(Inserted::Unmet);
    }
    // Shared by every row's binding instead of a copy of the text per row.
    let stream_type: Arc<str> = Arc::from(stream.stream_type());
    let stream_id: Arc<str> = Arc::from(stream.id());
    let mut version = current;
    let mut last_key = 0;
    let mut start = 0;
    while start < batch.len() {
        let end = (start + sql::MAX_ROWS_PER_INSERT).min(batch.len());
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql::insert_rows(end - start)));
        for i in start..end {
            version = version.checked_add(1).ok_or_else(|| {
                sqlx::Error::Protocol(format!("stream version {version} cannot grow"))
            })?;
            query = query
                .bind(Arc::clone(&stream_type))
                .bind(Arc::clone(&stream_id))
                .bind(version)
                .bind(&batch.ids[i][..])
                .bind(&batch.types[i])
                .bind(batch.schema_versions[i])
                .bind(&batch.payloads[i])
                .bind(&batch.metadata[i])
                .bind(recorded_at);
        }
        last_key = query.execute(&mut *conn).await?.last_insert_rowid();
        start = end;
    }
    Ok(Inserted::Stored {
        version: StreamVersion::new(u64::try_from(version).unwrap_or_default()),
        last_key,
    })
}

/// [`sql::INSERT_GUARDED`] of the one event of `batch`, after the stream's current version, if it
/// meets `expected`.
async fn insert_guarded(
    conn: &mut SqliteConnection,
    stream: &StreamId,
    expected: ExpectedVersion,
    batch: &Encoded,
    recorded_at: i64,
) -> Result<Inserted, sqlx::Error> {
    // The version the stream reaches when the expectation pins the current one; otherwise the
    // statement returns the version it stored.
    let (kind, exact, reached) = match expected {
        ExpectedVersion::Any => (sql::expect::ANY, 0, None),
        ExpectedVersion::StreamExists => (sql::expect::STREAM_EXISTS, 0, None),
        ExpectedVersion::NoStream => (sql::expect::NO_STREAM, 0, Some(1)),
        ExpectedVersion::Exact(version) => (
            sql::expect::EXACT,
            // No stream is at a version beyond i64::MAX: -1 is met by none, as it should be.
            i64::try_from(version.get()).unwrap_or(-1),
            version.get().checked_add(1),
        ),
    };
    let statement = match reached {
        Some(_) => sql::INSERT_GUARDED,
        None => sql::INSERT_GUARDED_RETURNING,
    };
    let query = sqlx::query(statement)
        .bind(stream.stream_type())
        .bind(stream.id())
        .bind(recorded_at)
        .bind(kind)
        .bind(exact)
        .bind(&batch.ids[0][..])
        .bind(&batch.types[0])
        .bind(batch.schema_versions[0])
        .bind(&batch.payloads[0])
        .bind(&batch.metadata[0]);
    let (stored, version, last_key) = match reached {
        Some(reached) => {
            let done = query.execute(&mut *conn).await?;
            (done.rows_affected(), reached, done.last_insert_rowid())
        }
        None => {
            let rows = query.fetch_all(&mut *conn).await?;
            let mut version = 0_i64;
            let mut last_key = 0_i64;
            for row in &rows {
                version = version.max(sqlx::Row::try_get(row, 0)?);
                last_key = last_key.max(sqlx::Row::try_get(row, 1)?);
            }
            (
                rows.len() as u64,
                u64::try_from(version).unwrap_or_default(),
                last_key,
            )
        }
    };
    if stored == 0 {
        return Ok(Inserted::Unmet);
    }
    Ok(Inserted::Stored {
        version: StreamVersion::new(version),
        last_key,
    })
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
