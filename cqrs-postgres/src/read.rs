//! The read path: streams, the global log below the visibility horizon, heads and counts.

use std::time::{Duration, Instant};

use async_trait::async_trait;
use cqrs_core::backend::validate_types;
use cqrs_core::{
    AppendResult, EventId, EventStore, EventTypes, ExpectedVersion, NewEvent, Position,
    RecordedEvent, ReplayEvent, StoreError, StreamId, StreamVersion,
};
use futures_util::TryStreamExt;
use sqlx::postgres::{PgArguments, PgRow, Postgres};
use sqlx::Row;

use crate::error::map_error;
use crate::{append, load, notify, row, PostgresStore};

impl PostgresStore {
    /// Runs a count statement: `all`, or `only` with the type names first; then each position
    /// as its `(tx, sequence)` pair.
    pub(crate) async fn count(
        &self,
        all: &sqlx::SqlStr,
        only: &sqlx::SqlStr,
        types: EventTypes<'_>,
        positions: &[Position],
    ) -> Result<u64, StoreError> {
        validate_types(types)?;
        let mut query = match types {
            EventTypes::All => sqlx::query_scalar(all.clone()),
            EventTypes::Only(names) => sqlx::query_scalar(only.clone()).bind(names.to_vec()),
        };
        for position in positions {
            query = query
                .bind(position.tx.to_string())
                .bind(sequence_after(*position));
        }
        let count: i64 = query
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(u64::try_from(count).unwrap_or_default())
    }

    pub(crate) async fn read_page(
        &self,
        after: Position,
        types: EventTypes<'_>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let query = match types {
            EventTypes::All => sqlx::query(self.sql.read_all.clone()),
            EventTypes::Only(names) => {
                sqlx::query(self.sql.read_all_filtered.clone()).bind(names.to_vec())
            }
        };
        let rows = query
            .bind(after.tx.to_string())
            .bind(sequence_after(after))
            .bind(limit)
            .fetch(&self.pool);
        self.decode_rows(rows, limit).await
    }

    /// Decodes rows as they arrive, so PostgreSQL sends the rest of a page while the first rows
    /// are decoded (a `fetch_all` would receive everything first, then decode).
    pub(crate) async fn decode_rows(
        &self,
        rows: impl futures_util::Stream<Item = Result<PgRow, sqlx::Error>> + Unpin,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.decode_rows_with(rows, limit, row::recorded).await
    }

    async fn decode_rows_with<T, E: From<StoreError>>(
        &self,
        mut rows: impl futures_util::Stream<Item = Result<PgRow, sqlx::Error>> + Unpin,
        limit: i64,
        decode: impl Fn(&PgRow) -> Result<T, E>,
    ) -> Result<Vec<T>, E> {
        let mut events = Vec::with_capacity(usize::try_from(limit).unwrap_or(0).min(1024));
        while let Some(row) = rows.try_next().await.map_err(|e| self.fail(e))? {
            events.push(decode(&row)?);
        }
        Ok(events)
    }

    /// One stream's rows from `statement` (`$1` stream type, `$2` id, `$3` first version, `$4`
    /// limit), each decoded by `decode`, read as a command's load (see
    /// [`PostgresStore::rows_for_load`]). The caller has validated `stream`.
    async fn stream_rows<T, E: RowError>(
        &self,
        statement: &sqlx::SqlStr,
        stream: &StreamId,
        from: StreamVersion,
        limit: usize,
        decode: impl Fn(&PgRow) -> Result<T, E> + Copy,
    ) -> Result<Vec<T>, E> {
        let query = || {
            sqlx::query(statement.clone())
                .bind(stream.stream_type())
                .bind(stream.id())
                .bind(i64::try_from(from.get()).unwrap_or(i64::MAX))
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
        };
        self.rows_for_load(query, limit, decode).await
    }

    /// The rows of `query` (at most about `limit`), each decoded by `decode`. With group commit,
    /// a load before a command runs on a connection the store keeps, if one is idle (no pool
    /// round trips; on a connection error, the server closed it meanwhile, it reads from the pool
    /// instead), and a connection it had to take from the pool is kept afterwards in the same
    /// way: under load, the loads of the commands that miss the aggregate cache then skip the
    /// pool's two pings as the writes do.
    pub(crate) async fn rows_for_load<'q, T, E: RowError>(
        &self,
        query: impl Fn() -> sqlx::query::Query<'q, Postgres, PgArguments>,
        limit: usize,
        decode: impl Fn(&PgRow) -> Result<T, E> + Copy,
    ) -> Result<Vec<T>, E> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        if let Some(group) = &self.group {
            if let Some(mut conn) = group.borrow_kept() {
                match self
                    .decode_rows_with(query().fetch(&mut *conn), limit, decode)
                    .await
                {
                    Ok(events) => {
                        group.give_back(conn);
                        return Ok(events);
                    }
                    Err(error) if error.is_connection() => {}
                    Err(other) => return Err(other),
                }
            }
            let mut conn = self
                .pool
                .acquire()
                .await
                .map_err(|e| E::from(self.fail(e)))?;
            let events = self
                .decode_rows_with(query().fetch(&mut *conn), limit, decode)
                .await?;
            group.give_back(conn);
            return Ok(events);
        }
        self.decode_rows_with(query().fetch(&self.pool), limit, decode)
            .await
    }

    /// After a short read that ended at `after`: if events after it exist (they were above the
    /// horizon when read, or committed since), waits until the horizon passes them, at most
    /// `horizon_wait`. `true` if a re-read will find them.
    pub(crate) async fn wait_for_pending(
        &self,
        after: Position,
        types: EventTypes<'_>,
    ) -> Result<bool, StoreError> {
        let query = match types {
            EventTypes::All => sqlx::query(self.sql.pending.clone()),
            EventTypes::Only(names) => {
                sqlx::query(self.sql.pending_filtered.clone()).bind(names.to_vec())
            }
        };
        let row = query
            .bind(after.tx.to_string())
            .bind(sequence_after(after))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        let Some(row) = row else { return Ok(false) };
        let tx_of = |column: &str| -> Result<u64, StoreError> {
            let text: String = row.try_get(column).map_err(map_error)?;
            row::parse_tx(&text).map_err(|e| StoreError::Backend(e.into()))
        };
        let pending = tx_of("tx_text")?;
        if tx_of("horizon")? > pending {
            return Ok(true);
        }
        let deadline = Instant::now() + self.horizon_wait;
        let mut pause = Duration::from_millis(1);
        loop {
            if Instant::now() + pause > deadline {
                return Ok(false);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(25));
            let horizon: String = sqlx::query_scalar(self.sql.horizon.clone())
                .fetch_one(&self.pool)
                .await
                .map_err(|e| self.fail(e))?;
            if row::parse_tx(&horizon).map_err(|e| StoreError::Backend(e.into()))? > pending {
                return Ok(true);
            }
        }
    }
}

/// The error of a row read: a connection error makes a read on a kept connection retry on the pool.
pub(crate) trait RowError: From<StoreError> {
    fn is_connection(&self) -> bool;
}

impl RowError for StoreError {
    fn is_connection(&self) -> bool {
        matches!(self, StoreError::Connection(_))
    }
}

/// Why a replay page was not read: a row without a position cannot name itself in an error.
enum ReplayRowError {
    Store(StoreError),
    Unreadable,
}

impl From<StoreError> for ReplayRowError {
    fn from(error: StoreError) -> Self {
        Self::Store(error)
    }
}

impl RowError for ReplayRowError {
    fn is_connection(&self) -> bool {
        matches!(self, Self::Store(error) if error.is_connection())
    }
}

/// The `after` cursor's sequence as a bigint; beyond `i64::MAX` nothing can follow it anyway.
fn sequence_after(after: Position) -> i64 {
    i64::try_from(after.sequence).unwrap_or(i64::MAX)
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        self.append_events(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: StreamVersion,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        stream.validate()?;
        let read = &self.sql.read_stream;
        self.stream_rows(read, stream, from, limit, row::recorded)
            .await
    }

    async fn read_stream_for_replay(
        &self,
        stream: &StreamId,
        from: StreamVersion,
        limit: usize,
    ) -> Result<Vec<ReplayEvent>, StoreError> {
        stream.validate()?;
        // A command's load: read with the loads of other commands when group commit is on.
        let mut reading = None;
        if let Some(group) = &self.group {
            match group.loads.load(self, stream, from, limit).await {
                load::Load::Read(events) => return Ok(events),
                load::Load::Alone(held) => reading = held,
            }
        }
        let read = &self.sql.read_stream_for_replay;
        let rows = self
            .stream_rows(read, stream, from, limit, |row| {
                row::replayed(row).ok_or(ReplayRowError::Unreadable)
            })
            .await;
        drop(reading);
        match rows {
            Ok(events) => Ok(events),
            // The full read fails on the same row, with the error naming its position.
            Err(ReplayRowError::Unreadable) => {
                let events = self.read_stream(stream, from, limit).await?;
                Ok(events.into_iter().map(ReplayEvent::from).collect())
            }
            Err(ReplayRowError::Store(error)) => Err(error),
        }
    }

    async fn read_all(
        &self,
        after: Position,
        types: EventTypes<'_>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        validate_types(types)?;
        let mut events = self.read_page(after, types, limit).await?;
        if events.len() >= limit || self.horizon_wait.is_zero() {
            return Ok(events);
        }
        // Short: events committed before this call may still be held above the horizon by
        // older running transactions. Wait for those to finish, then read on.
        let cursor = events.last().map_or(after, |e| e.position);
        if self.wait_for_pending(cursor, types).await? {
            let more = self.read_page(cursor, types, limit - events.len()).await?;
            events.extend(more);
        }
        Ok(events)
    }

    async fn find_event(&self, id: EventId) -> Result<Option<RecordedEvent>, StoreError> {
        let row = sqlx::query(self.sql.find_event.clone())
            .bind(*id.as_uuid())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        row.as_ref().map(row::recorded).transpose()
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<StreamVersion, StoreError> {
        stream.validate()?;
        let mut conn = self.pool.acquire().await.map_err(map_error)?;
        append::stream_version(&mut conn, &self.sql, stream).await
    }

    async fn head(&self) -> Result<Option<Position>, StoreError> {
        let row = sqlx::query(self.sql.head.clone())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        row.as_ref().map(row::position).transpose()
    }

    async fn committed_head(&self) -> Result<Option<Position>, StoreError> {
        let row = sqlx::query(self.sql.committed_head.clone())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        row.as_ref().map(row::position).transpose()
    }

    /// Waits (up to [`PostgresStore::with_horizon_wait`]) until the visibility horizon passes
    /// `position`'s transaction: then every transaction that could still write an event before
    /// it has finished.
    async fn wait_until_readable(&self, position: Position) -> Result<(), StoreError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(1);
        loop {
            let horizon: String = sqlx::query_scalar(self.sql.horizon.clone())
                .fetch_one(&self.pool)
                .await
                .map_err(|e| self.fail(e))?;
            if row::parse_tx(&horizon).map_err(|e| StoreError::Backend(e.into()))? > position.tx {
                return Ok(());
            }
            let waited = started.elapsed();
            if waited + pause > self.horizon_wait {
                return Err(StoreError::NotYetReadable {
                    position,
                    waited,
                    held_by: self.horizon().await?.to_string(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(25));
        }
    }

    async fn count_after(&self, after: Position, types: EventTypes<'_>) -> Result<u64, StoreError> {
        let (all, only) = (&self.sql.count_after, &self.sql.count_after_filtered);
        self.count(all, only, types, &[after]).await
    }

    async fn count_between(
        &self,
        after: Position,
        until: Position,
        types: EventTypes<'_>,
    ) -> Result<u64, StoreError> {
        let (all, only) = (&self.sql.count_between, &self.sql.count_between_filtered);
        self.count(all, only, types, &[after, until]).await
    }

    /// Wakes on this store's `NOTIFY` (one background listener connection per store, started on
    /// first use), or after `timeout`.
    async fn wait_for_append(&self, after: Position, timeout: Duration) {
        let notifier = self
            .notifier
            .get_or_init(|| notify::Notifier::start(&self.pool, self.sql.channel.clone()));
        notifier.wait(after, timeout).await;
    }
}
