//! PostgreSQL backend for `cqrs-core`: events, snapshots and checkpoints in one schema.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cqrs_core::StoreError> {
//! let store = cqrs_postgres::PostgresStore::connect("postgres://postgres@127.0.0.1/test")
//!     .await?
//!     .with_schema("bank")?;
//! store.migrate().await?;
//! # Ok(()) }
//! ```
//!
//! - **Append** is one guarded statement per batch (`INSERT … SELECT … FROM UNNEST(…) WHERE <stream is
//!   at the expected version>`), so a batch is all-or-nothing and never leaves a version gap; the unique
//!   index on `(stream_type, stream_id, stream_version)` rejects the loser of a race.
//! - **Idempotency**: a batch whose event ids are stored resolves through
//!   [`cqrs_core::store::resolve_retry`], exactly like every other backend.
//! - **Gap-free reads**: `read_all` orders by `(tx, position)` and reads only below the oldest running
//!   transaction (`pg_snapshot_xmin`), so a reader never passes an event that commits later with a
//!   lower position.
//! - **SQL**: statements are built once per schema in `sql.rs`; the only text spliced in is the
//!   validated, quoted schema name (hence `AssertSqlSafe`); every value is a bound parameter.
//! - **Immutability**: a trigger rejects `UPDATE` and `DELETE` on the events table.
#![forbid(unsafe_code)]
#![warn(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod sql;

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_core::store::{resolve_retry, validate_append, StoredEventRef};
use cqrs_core::{
    AppendResult, CheckpointStore, ConcurrencyError, EventId, EventStore, EventTypes,
    ExpectedVersion, Metadata, NewEvent, Position, RecordedEvent, Snapshot, SnapshotStore,
    StoreError, StreamId, StreamVersion,
};
use sqlx::postgres::{PgPool, PgPoolOptions, PgRow};
use sqlx::Row;
use uuid::Uuid;

/// The events, snapshots and checkpoints of one schema. Cheap to clone (shares the pool).
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Arc<sql::Statements>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.sql.schema)
            .finish()
    }
}

impl PostgresStore {
    /// Connects a pool of 10 connections to `url`, using schema `public`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect(url)
            .await
            .map_err(map_error)?;
        Ok(Self::new(pool))
    }

    /// A store on an existing pool, using schema `public`.
    pub fn new(pool: PgPool) -> Self {
        Self {
            pool,
            sql: Arc::new(sql::Statements::new("public")),
        }
    }

    /// Uses schema `schema` (lower-case letters, digits and `_`, starting with a letter or `_`, at
    /// most 63 bytes) for every table. The name is validated, then quoted into the statements; all
    /// values are bound parameters.
    pub fn with_schema(mut self, schema: &str) -> Result<Self, StoreError> {
        let valid = !schema.is_empty()
            && schema.len() <= 63
            && schema.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
            && schema
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(StoreError::InvalidId(cqrs_core::stream::InvalidId {
                what: "schema name",
                reason: format!("`{schema}` must match [a-z_][a-z0-9_]* and be at most 63 bytes"),
            }));
        }
        self.sql = Arc::new(sql::Statements::new(schema));
        Ok(self)
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema this store uses.
    pub fn schema(&self) -> &str {
        &self.sql.schema
    }

    /// Creates the schema, tables, indexes and the immutability trigger if they do not exist.
    /// Safe to run concurrently and repeatedly.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await.map_err(map_error)?;
        // Serialize concurrent migrations of the same schema.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
            .bind(format!("cqrs-migrate:{}", self.sql.schema))
            .execute(&mut *tx)
            .await
            .map_err(map_error)?;
        for statement in &self.sql.migration {
            sqlx::query(sqlx::AssertSqlSafe(statement.as_str()))
                .execute(&mut *tx)
                .await
                .map_err(map_error)?;
        }
        tx.commit().await.map_err(map_error)
    }

    async fn stored_refs(&self, ids: &[Uuid]) -> Result<Vec<StoredEventRef>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(self.sql.find_ids.as_str()))
            .bind(ids)
            .fetch_all(&self.pool)
            .await
            .map_err(map_error)?;
        rows.iter()
            .map(|row| {
                let position = position_of(row)?;
                Ok(StoredEventRef {
                    event_id: EventId::from_uuid(
                        row.try_get("event_id").map_err(|e| corrupt(position, &e))?,
                    ),
                    stream: StreamId::new(
                        row.try_get::<String, _>("stream_type")
                            .map_err(|e| corrupt(position, &e))?,
                        row.try_get::<String, _>("stream_id")
                            .map_err(|e| corrupt(position, &e))?,
                    ),
                    stream_version: version_of(row, position)?,
                    position,
                })
            })
            .collect()
    }

    /// One guarded insert; `Ok(None)` when the stream was not at `base` (or a racer won).
    async fn try_append(
        &self,
        stream: &StreamId,
        base: StreamVersion,
        events: &[NewEvent],
    ) -> Result<Option<AppendResult>, sqlx::Error> {
        let n = events.len();
        let mut versions = Vec::with_capacity(n);
        let mut ids = Vec::with_capacity(n);
        let mut types = Vec::with_capacity(n);
        let mut schema_versions = Vec::with_capacity(n);
        let mut payloads = Vec::with_capacity(n);
        let mut metadata = Vec::with_capacity(n);
        for (offset, event) in (1_i64..).zip(events) {
            versions.push(
                i64::try_from(base.get())
                    .unwrap_or(i64::MAX)
                    .saturating_add(offset),
            );
            ids.push(*event.event_id.as_uuid());
            types.push(event.event_type.as_str());
            schema_versions.push(i32::try_from(event.schema_version).unwrap_or(i32::MAX));
            payloads.push(event.payload.to_string());
            metadata
                .push(serde_json::to_string(&event.metadata).unwrap_or_else(|_| "{}".to_owned()));
        }
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query(sqlx::AssertSqlSafe(self.sql.append.as_str()))
            .bind(stream.stream_type())
            .bind(stream.id())
            .bind(i64::try_from(base.get()).unwrap_or(i64::MAX))
            .bind(&versions)
            .bind(&ids)
            .bind(&types)
            .bind(&schema_versions)
            .bind(&payloads)
            .bind(&metadata)
            .fetch_all(&mut *tx)
            .await;
        let rows = match inserted {
            Ok(rows) => rows,
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("23505") => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        if rows.len() != n {
            return Ok(None);
        }
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(&self.sql.channel)
            .bind(stream.stream_type())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        // One transaction: one tx id; the batch's last event has the highest position.
        let mut last: Option<(String, i64)> = None;
        for row in &rows {
            let position: i64 = row.try_get("position")?;
            if last.as_ref().is_none_or(|(_, p)| position > *p) {
                last = Some((row.try_get("tx_text")?, position));
            }
        }
        let (tx_text, position) =
            last.ok_or_else(|| sqlx::Error::Protocol("append returned no rows".into()))?;
        let tx_id = tx_text
            .parse()
            .map_err(|e| sqlx::Error::Protocol(format!("bad transaction id `{tx_text}`: {e}")))?;
        Ok(Some(AppendResult {
            stream_version: base.advance(n as u64),
            position: Position::new(tx_id, u64::try_from(position).unwrap_or_default()),
        }))
    }
}

/// Maps driver errors: lost or unavailable connections become [`StoreError::Connection`].
pub fn map_error(error: sqlx::Error) -> StoreError {
    let connection_class = match &error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(e) => e
            .code()
            .is_some_and(|c| c.starts_with("08") || c == "57P01" || c == "57P02" || c == "57P03"),
        _ => false,
    };
    if connection_class {
        StoreError::Connection(Box::new(error))
    } else {
        StoreError::Backend(Box::new(error))
    }
}

fn corrupt(position: Position, reason: &dyn std::fmt::Display) -> StoreError {
    StoreError::CorruptEvent {
        position,
        reason: reason.to_string(),
    }
}

fn position_of(row: &PgRow) -> Result<Position, StoreError> {
    let sequence: i64 = row.try_get("position").map_err(map_error)?;
    let sequence = u64::try_from(sequence).unwrap_or_default();
    let tx: String = row.try_get("tx_text").map_err(map_error)?;
    let tx = tx.parse().map_err(|e| {
        corrupt(
            Position::new(0, sequence),
            &format!("bad transaction id `{tx}`: {e}"),
        )
    })?;
    Ok(Position::new(tx, sequence))
}

fn version_of(row: &PgRow, position: Position) -> Result<StreamVersion, StoreError> {
    let version: i64 = row
        .try_get("stream_version")
        .map_err(|e| corrupt(position, &e))?;
    u64::try_from(version)
        .map(StreamVersion::new)
        .map_err(|_| corrupt(position, &format!("negative stream version {version}")))
}

fn recorded(row: &PgRow) -> Result<RecordedEvent, StoreError> {
    let position = position_of(row)?;
    let get_text = |column: &str| {
        row.try_get::<String, _>(column)
            .map_err(|e| corrupt(position, &e))
    };
    let payload = serde_json::from_str(&get_text("payload_text")?)
        .map_err(|e| corrupt(position, &format!("payload: {e}")))?;
    let metadata: Metadata = serde_json::from_str(&get_text("metadata_text")?)
        .map_err(|e| corrupt(position, &format!("metadata: {e}")))?;
    let schema_version: i32 = row
        .try_get("schema_version")
        .map_err(|e| corrupt(position, &e))?;
    Ok(RecordedEvent {
        event_id: EventId::from_uuid(row.try_get("event_id").map_err(|e| corrupt(position, &e))?),
        stream: StreamId::new(get_text("stream_type")?, get_text("stream_id")?),
        stream_version: version_of(row, position)?,
        position,
        event_type: get_text("event_type")?,
        schema_version: u32::try_from(schema_version).map_err(|_| {
            corrupt(
                position,
                &format!("negative schema version {schema_version}"),
            )
        })?,
        recorded_at: row
            .try_get::<DateTime<Utc>, _>("recorded_at")
            .map_err(|e| corrupt(position, &e))?,
        payload,
        metadata,
    })
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn limit(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        validate_append(stream, &events)?;
        if let Some(event) = events
            .iter()
            .find(|e| e.payload.to_string().contains("\\u0000"))
        {
            return Err(StoreError::Backend(
                format!("event {} has a NUL character in its payload, which PostgreSQL jsonb cannot store", event.event_id).into(),
            ));
        }
        loop {
            let base = match expected {
                ExpectedVersion::Exact(v) => v,
                ExpectedVersion::NoStream => StreamVersion::INITIAL,
                ExpectedVersion::Any | ExpectedVersion::StreamExists => {
                    self.stream_version(stream).await?
                }
            };
            if expected == ExpectedVersion::StreamExists && base == StreamVersion::INITIAL {
                let ids: Vec<Uuid> = events.iter().map(|e| *e.event_id.as_uuid()).collect();
                let stored = self.stored_refs(&ids).await?;
                if !stored.is_empty() {
                    return resolve_retry(stream, &events, &stored);
                }
                return Err(ConcurrencyError {
                    stream: stream.clone(),
                    expected,
                    actual: base,
                }
                .into());
            }
            if let Some(result) = self
                .try_append(stream, base, &events)
                .await
                .map_err(map_error)?
            {
                return Ok(result);
            }
            // Not written: a retry of a stored batch, or the stream moved.
            let ids: Vec<Uuid> = events.iter().map(|e| *e.event_id.as_uuid()).collect();
            let stored = self.stored_refs(&ids).await?;
            if !stored.is_empty() {
                return resolve_retry(stream, &events, &stored);
            }
            let actual = self.stream_version(stream).await?;
            if matches!(
                expected,
                ExpectedVersion::Any | ExpectedVersion::StreamExists
            ) {
                continue; // lost a race; `Any`/`StreamExists` still hold, try at the new version
            }
            return Err(ConcurrencyError {
                stream: stream.clone(),
                expected,
                actual,
            }
            .into());
        }
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: StreamVersion,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(self.sql.read_stream.as_str()))
            .bind(stream.stream_type())
            .bind(stream.id())
            .bind(to_i64(from.get()))
            .bind(limit(max))
            .fetch_all(&self.pool)
            .await
            .map_err(map_error)?;
        rows.iter().map(recorded).collect()
    }

    async fn read_all(
        &self,
        after: Position,
        types: EventTypes<'_>,
        max: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let query = match types {
            EventTypes::All => sqlx::query(sqlx::AssertSqlSafe(self.sql.read_all.as_str())),
            EventTypes::Only(names) => {
                sqlx::query(sqlx::AssertSqlSafe(self.sql.read_all_filtered.as_str()))
                    .bind(names.to_vec())
            }
        };
        let rows = query
            .bind(after.tx.to_string())
            .bind(to_i64(after.sequence))
            .bind(limit(max))
            .fetch_all(&self.pool)
            .await
            .map_err(map_error)?;
        rows.iter().map(recorded).collect()
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<StreamVersion, StoreError> {
        let version: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(self.sql.stream_version.as_str()))
                .bind(stream.stream_type())
                .bind(stream.id())
                .fetch_one(&self.pool)
                .await
                .map_err(map_error)?;
        Ok(StreamVersion::new(
            u64::try_from(version).unwrap_or_default(),
        ))
    }

    async fn head(&self) -> Result<Option<Position>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(self.sql.head.as_str()))
            .fetch_optional(&self.pool)
            .await
            .map_err(map_error)?;
        row.as_ref().map(position_of).transpose()
    }

    async fn count_after(&self, after: Position, types: EventTypes<'_>) -> Result<u64, StoreError> {
        let query = match types {
            EventTypes::All => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(self.sql.count_after.as_str()))
            }
            EventTypes::Only(names) => {
                sqlx::query_scalar(sqlx::AssertSqlSafe(self.sql.count_after_filtered.as_str()))
                    .bind(names.to_vec())
            }
        };
        let count: i64 = query
            .bind(after.tx.to_string())
            .bind(to_i64(after.sequence))
            .fetch_one(&self.pool)
            .await
            .map_err(map_error)?;
        Ok(u64::try_from(count).unwrap_or_default())
    }
}

#[async_trait]
impl SnapshotStore for PostgresStore {
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(self.sql.load_snapshot.as_str()))
            .bind(stream.stream_type())
            .bind(stream.id())
            .fetch_optional(&self.pool)
            .await
            .map_err(map_error)?;
        let Some(row) = row else { return Ok(None) };
        let version: i64 = row.try_get("stream_version").map_err(map_error)?;
        let snapshot_version: i32 = row.try_get("snapshot_version").map_err(map_error)?;
        let payload: String = row.try_get("payload_text").map_err(map_error)?;
        // An unreadable snapshot is no snapshot: the repository replays the stream.
        let Ok(payload) = serde_json::from_str(&payload) else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            stream: stream.clone(),
            stream_version: StreamVersion::new(u64::try_from(version).unwrap_or_default()),
            snapshot_version: u32::try_from(snapshot_version).unwrap_or_default(),
            payload,
        }))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        snapshot.stream.validate()?;
        sqlx::query(sqlx::AssertSqlSafe(self.sql.save_snapshot.as_str()))
            .bind(snapshot.stream.stream_type())
            .bind(snapshot.stream.id())
            .bind(to_i64(snapshot.stream_version.get()))
            .bind(i32::try_from(snapshot.snapshot_version).unwrap_or(i32::MAX))
            .bind(snapshot.payload.to_string())
            .execute(&self.pool)
            .await
            .map_err(map_error)?;
        Ok(())
    }
}

#[async_trait]
impl CheckpointStore for PostgresStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        let row = sqlx::query(sqlx::AssertSqlSafe(self.sql.load_checkpoint.as_str()))
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(map_error)?;
        row.map(|r| {
            let tx: i64 = r.try_get("tx").map_err(map_error)?;
            let position: i64 = r.try_get("position").map_err(map_error)?;
            Ok(Position::new(
                u64::try_from(tx).unwrap_or_default(),
                u64::try_from(position).unwrap_or_default(),
            ))
        })
        .transpose()
    }

    async fn save_checkpoint(
        &self,
        name: &str,
        expected: Option<Position>,
        new: Position,
    ) -> Result<(), StoreError> {
        let done = match expected {
            None => {
                sqlx::query(sqlx::AssertSqlSafe(self.sql.insert_checkpoint.as_str()))
                    .bind(name)
                    .bind(to_i64(new.tx))
                    .bind(to_i64(new.sequence))
                    .execute(&self.pool)
                    .await
            }
            Some(old) => {
                sqlx::query(sqlx::AssertSqlSafe(self.sql.update_checkpoint.as_str()))
                    .bind(name)
                    .bind(to_i64(new.tx))
                    .bind(to_i64(new.sequence))
                    .bind(to_i64(old.tx))
                    .bind(to_i64(old.sequence))
                    .execute(&self.pool)
                    .await
            }
        }
        .map_err(map_error)?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        Err(StoreError::CheckpointConflict {
            name: name.to_owned(),
            expected,
            actual: self.load_checkpoint(name).await?,
        })
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<(), StoreError> {
        sqlx::query(sqlx::AssertSqlSafe(self.sql.delete_checkpoint.as_str()))
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(map_error)?;
        Ok(())
    }
}
