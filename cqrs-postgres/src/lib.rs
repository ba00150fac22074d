//! PostgreSQL backend for `cqrs-core`: events, snapshots and checkpoints in one schema.
//!
//! ```no_run
//! use cqrs_core::{EventId, EventStore, ExpectedVersion, NewEvent, StreamId};
//! use cqrs_postgres::PostgresStore;
//!
//! fn opened(owner: &str) -> NewEvent {
//!     NewEvent {
//!         event_id: EventId::new(),
//!         event_type: "Opened".into(),
//!         schema_version: 1,
//!         payload: serde_json::json!({ "owner": owner }),
//!         metadata: Default::default(),
//!     }
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PostgresStore::connect("postgres://postgres@127.0.0.1:5432/test")
//!     .await?
//!     .with_schema("bank")?;
//! store.migrate().await?; // explicit: creates or upgrades the schema's tables
//!
//! let account = StreamId::new("account", "acc-42");
//! let written = store.append(&account, ExpectedVersion::NoStream, vec![opened("ada")]).await?;
//! println!("at version {} and position {}", written.stream_version, written.position);
//!
//! // Append atomically with your own writes (an outbox row, an inline read model):
//! let mut tx = store.pool().begin().await?;
//! let expected = ExpectedVersion::Exact(written.stream_version);
//! store.append_in(&mut tx, &account, expected, vec![opened("bob")]).await?;
//! sqlx::query("INSERT INTO outbox (body) VALUES ('account opened')").execute(&mut *tx).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! # How it works
//!
//! - **Schema.** One `events` table (global `position` identity, the writing transaction's `tx xid8`,
//!   stream type/id/version, unique event id, type, schema version, `jsonb` payload and metadata,
//!   `recorded_at`; primary key `(tx, position)`, the order of global reads), `snapshots` and `checkpoints`, created by [`PostgresStore::migrate`] from the
//!   embedded migrations in `migrations/` inside the configured schema ([`PostgresStore::with_schema`]).
//!   Every statement names the schema explicitly; only the validated, quoted schema name is spliced
//!   into SQL, every value is a bound parameter.
//! - **Append** is one statement per batch (`INSERT … SELECT`, the batch unnested from arrays or,
//!   for a single event, bound as scalars) that reads the stream's version, checks the expectation and inserts consecutive versions. The unique index on
//!   `(stream_type, stream_id, stream_version)` rejects the loser of a race (SQLSTATE 23505), which
//!   becomes a [`cqrs_core::ConcurrencyError`] with the actual version (`Any` and `StreamExists`
//!   retry instead). A 23505 on the event id means a retry: the ids are looked up and
//!   [`cqrs_core::backend::resolve_retry`] decides, exactly as for every other backend.
//! - **Wake-ups.** Committed appends are announced with `NOTIFY` on
//!   [`PostgresStore::notification_channel`], at most once per 2 ms: the first append of an
//!   interval notifies in its own statement, later ones are covered by the next, and a background
//!   task sends one trailing `NOTIFY` for what no append carried. A `pg_notify` inside every append
//!   would serialize all concurrent commits on PostgreSQL's notification lock. `append_in` always
//!   notifies in its statement, delivered when the caller commits.
//! - **Gap-free reads.** [`EventStore::read_all`] orders by `(tx, position)` and returns only events
//!   below the visibility horizon `pg_snapshot_xmin(pg_current_snapshot())`: every transaction
//!   below it has finished, and any later writer gets a larger `tx`, so nothing can commit behind
//!   a reader's cursor. One long transaction anywhere in the cluster holds the horizon back;
//!   [`PostgresStore::horizon`] says which. When a read comes back short while committed events
//!   wait above the horizon, it waits (up to [`PostgresStore::with_horizon_wait`]) for the
//!   in-flight transactions below them to finish, so a reader sees what was committed before it
//!   asked.
//! - **Immutability.** A trigger rejects `UPDATE`, `DELETE` and `TRUNCATE` on the events table.
//! - **Group commit** (opt-in, [`PostgresStore::with_group_commit`]): concurrent appends to
//!   different streams are written in one statement and one commit by whichever caller finds a
//!   free slot; each caller still gets its own result or concurrency error. The slots keep their
//!   connections between writes, so appends skip the pool's checkout round trips.
//!
//! **Round trips to the pool.** Everything else takes a connection from the `PgPool` per
//! operation, and sqlx pings it on the way out and on the way back: on a local database the same
//! single-row INSERT runs about 1.3x faster (1 client) on a connection kept out of the pool
//! (BENCHMARKS.md, W1). The ping on checkout
//! can be turned off where connections are trusted, `PgPoolOptions::test_before_acquire(false)`;
//! the one on return cannot.
#![forbid(unsafe_code)]
#![warn(missing_docs, clippy::unwrap_used, clippy::expect_used)]

mod append;
mod error;
mod group;
mod inline;
mod notify;
mod projections;
mod row;
mod sql;
mod tx;

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cqrs_core::backend::validate_types;
use cqrs_core::{
    AppendResult, CheckpointStore, EventStore, EventTypes, ExpectedVersion, NewEvent, Position,
    RecordedEvent, Snapshot, SnapshotStore, StoreError, StreamId, StreamVersion,
};
use futures_util::TryStreamExt;
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Executor, Row};

pub use error::{map_error, SchemaMismatch};
pub use group::GroupCommit;
pub use notify::AppendListener;
pub use projections::PostgresProjections;
pub use sql::MAX_SCHEMA_LEN;

use crate::error::{map_error_in, out_of_range};

/// The embedded migrations (`cqrs-postgres/migrations/`), applied by [`PostgresStore::migrate`].
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Default for [`PostgresStore::with_horizon_wait`].
pub const DEFAULT_HORIZON_WAIT: Duration = Duration::from_secs(5);

/// The events, snapshots and checkpoints of one schema. Cheap to clone: clones share the pool (and
/// the group-commit writer, if any).
#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    sql: Arc<sql::Statements>,
    horizon_wait: Duration,
    notifier: Arc<OnceLock<Arc<notify::Notifier>>>,
    announcer: Arc<OnceLock<Arc<notify::Announcer>>>,
    group: Option<Arc<group::GroupCommitter>>,
    inline: Arc<[Arc<dyn inline::Inline>]>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.sql.schema)
            .field("horizon_wait", &self.horizon_wait)
            .field("group_commit", &self.group.as_ref().map(|g| g.config()))
            .field(
                "inline",
                &self.inline.iter().map(|p| p.name()).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects a pool of up to 10 connections to `url`; the store uses schema `public`.
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
            horizon_wait: DEFAULT_HORIZON_WAIT,
            notifier: Arc::default(),
            announcer: Arc::default(),
            group: None,
            inline: Arc::new([]),
        }
    }

    /// Uses schema `schema` for every table: `[a-z_][a-z0-9_]*`, at most [`MAX_SCHEMA_LEN`] bytes,
    /// not a system schema (`pg_*`, `information_schema`). The name is validated, then quoted into
    /// the statements.
    pub fn with_schema(mut self, schema: &str) -> Result<Self, StoreError> {
        sql::validate_schema(schema)?;
        self.sql = Arc::new(sql::Statements::new(schema));
        self.notifier = Arc::default();
        self.announcer = Arc::default();
        if let Some(group) = &self.group {
            self.group = Some(group::GroupCommitter::new(
                self.pool.clone(),
                self.sql.clone(),
                group.config(),
            ));
        }
        Ok(self)
    }

    /// How long [`EventStore::read_all`] may wait when it comes back short while events committed
    /// before the call are still held above the visibility horizon by older, running
    /// transactions (default [`DEFAULT_HORIZON_WAIT`]). The wait ends as soon as they finish.
    /// `Duration::ZERO` returns at once with what is below the horizon.
    pub fn with_horizon_wait(mut self, wait: Duration) -> Self {
        self.horizon_wait = wait;
        self
    }

    /// Routes [`EventStore::append`] through group commit: concurrent appends to different
    /// streams are written in one statement and one transaction, by whichever caller leads the
    /// group (see [`GroupCommit`]); each caller still gets its own result or error. A lone append
    /// is written as usual. [`PostgresStore::append_in`] is unaffected (it uses the caller's
    /// transaction).
    ///
    /// Each of the `max_in_flight` slots keeps its pooled connection from write to write (for
    /// [`GroupCommit::keep_connection`] once appends pause, and never the pool's last idle one),
    /// which skips the two pings sqlx's pool spends on every checkout; a command's load
    /// ([`EventStore::read_stream`]) borrows an idle kept connection too. So up to
    /// `max_in_flight` connections of the pool are the store's while commands flow, and
    /// `PgPool::close` waits for them until the store is dropped or the keep time runs out.
    ///
    /// It trades parallelism for fewer statements, commits and round trips. In our benchmark
    /// (BENCHMARKS.md, W1; PostgreSQL on the same two cores) it made the aggregate-cached command
    /// path about 1.3x faster at 1 client (the kept connection) and 2x at 8 clients (groups on
    /// kept connections), level with one raw INSERT per command on kept connections. Appends of
    /// one stream are never grouped together: a hot single stream gains only the kept
    /// connection.
    pub fn with_group_commit(mut self, config: GroupCommit) -> Self {
        self.group = Some(group::GroupCommitter::new(
            self.pool.clone(),
            self.sql.clone(),
            config,
        ));
        self
    }

    /// Runs `projection` inside every append of this store (and its clones made afterwards):
    /// its handlers get the append's transaction (`type Context = sqlx::PgConnection`), so the
    /// events and the read-model rows commit together or not at all. A handler error fails the
    /// append with [`StoreError::InlineProjection`] and nothing is written. An idempotent retry of
    /// stored events does not run it again.
    ///
    /// The value is cloned for each append and the clone dropped afterwards: keep the read
    /// model's state in the database. Appends with inline projections bypass group commit (each
    /// runs its own transaction), and [`PostgresStore::append_in`] runs them in the caller's
    /// transaction. Use inline projections for read models that must never lag (uniqueness
    /// checks, balances shown right after a command); everything else is cheaper asynchronous
    /// ([`PostgresProjections`]).
    pub fn with_inline<P>(mut self, projection: P) -> Self
    where
        P: cqrs_core::Projection<Context = PgConnection> + Clone + Sync,
    {
        let mut inline = self.inline.to_vec();
        inline.push(Arc::new(inline::InlineProjection(projection)));
        self.inline = inline.into();
        self
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema this store uses.
    pub fn schema(&self) -> &str {
        &self.sql.schema
    }

    /// The `LISTEN/NOTIFY` channel appends are announced on after they commit: `<schema>_events`,
    /// with the position of the last appended event (`"<tx>.<sequence>"`) as payload. Announcements
    /// are coalesced: one notification may cover several appends.
    pub fn notification_channel(&self) -> &str {
        &self.sql.channel
    }

    /// Applies the embedded migrations to this store's schema, creating the schema if needed.
    /// Idempotent, and safe to run from several processes at once (sqlx's migration lock).
    ///
    /// The migrations are plain SQL with unqualified names; they run on a dedicated connection
    /// whose `search_path` is set to the schema only (so they land there), with the migration
    /// history in `<schema>._sqlx_migrations`. The connection is closed afterwards, never
    /// returned to the pool.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_error)?.detach();
        let result = self.migrate_on(&mut conn).await;
        let _ = sqlx::Connection::close(conn).await;
        result
    }

    async fn migrate_on(&self, conn: &mut PgConnection) -> Result<(), StoreError> {
        let quoted = &self.sql.quoted;
        conn.execute(sqlx::AssertSqlSafe(format!("SET search_path TO {quoted}")))
            .await
            .map_err(map_error)?;
        let mut migrator =
            sqlx::migrate::Migrator::with_migrations(MIGRATOR.iter().cloned().collect());
        migrator.create_schema(quoted.clone());
        migrator.dangerous_set_table_name(format!("{quoted}._sqlx_migrations"));
        migrator.run(&mut *conn).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => map_error(e),
            other => StoreError::Backend(Box::new(other)),
        })
    }

    /// Appends inside the caller's transaction, so the events commit (or roll back) together with
    /// the caller's other writes: inline projections, an outbox. Same checks, idempotency and
    /// result as [`EventStore::append`]; `conn` must be inside a transaction (pass
    /// `&mut *transaction`). Runs in a savepoint, so a conflict leaves the caller's transaction
    /// usable. The store's inline projections ([`PostgresStore::with_inline`]) run here too, in
    /// the same savepoint: if one fails, its writes and the events are undone together. The
    /// notification is sent when the caller commits.
    ///
    /// The events' `tx` is the caller's transaction id: while it stays open it holds every gap-free
    /// reader back, so keep such transactions short.
    pub async fn append_in(
        &self,
        conn: &mut PgConnection,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let batch = append::encode(stream, &events)?;
        if self.inline.is_empty() {
            return append::append_on(
                conn,
                &self.sql,
                stream,
                expected,
                &events,
                &batch,
                append::Mode::InTransaction,
            )
            .await
            .map(|appended| appended.result);
        }
        // Events and inline read-model writes are undone together if either fails, leaving the
        // caller's transaction usable and without events that no projection has seen.
        sqlx::raw_sql("SAVEPOINT cqrs_inline")
            .execute(&mut *conn)
            .await
            .map_err(append::savepoint_error)?;
        let outcome = async {
            let appended = append::append_on(
                conn,
                &self.sql,
                stream,
                expected,
                &events,
                &batch,
                append::Mode::InTransaction,
            )
            .await?;
            if appended.fresh {
                self.project_inline(conn, stream, &appended.result, events.len())
                    .await?;
            }
            Ok(appended.result)
        }
        .await;
        let end = if outcome.is_ok() {
            "RELEASE SAVEPOINT cqrs_inline"
        } else {
            "ROLLBACK TO SAVEPOINT cqrs_inline; RELEASE SAVEPOINT cqrs_inline"
        };
        sqlx::raw_sql(end)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.fail(e))?;
        outcome
    }

    /// Runs the inline projections over the events just appended on `conn` (inside the append's
    /// transaction; the caller undoes everything on error).
    async fn project_inline(
        &self,
        conn: &mut PgConnection,
        stream: &StreamId,
        written: &AppendResult,
        count: usize,
    ) -> Result<(), StoreError> {
        let last = written.stream_version.get();
        let first = last.saturating_sub(count as u64);
        let version = |v: u64| i64::try_from(v).map_err(|_| out_of_range("stream version", v));
        let rows = sqlx::query(self.sql.read_back.clone())
            .bind(stream.stream_type())
            .bind(stream.id())
            .bind(version(first)?)
            .bind(version(last)?)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| self.fail(e))?;
        let events = rows
            .iter()
            .map(row::recorded)
            .collect::<Result<Vec<_>, _>>()?;
        for projection in self.inline.iter() {
            projection
                .apply(&events, conn)
                .await
                .map_err(StoreError::InlineProjection)?;
        }
        Ok(())
    }

    /// [`CheckpointStore::load_checkpoint`] on the caller's connection (inside its transaction).
    pub async fn load_checkpoint_in(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<Option<Position>, StoreError> {
        validate_checkpoint_name(name)?;
        let row = sqlx::query(self.sql.load_checkpoint.clone())
            .bind(name)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.fail(e))?;
        row.as_ref().map(checkpoint_position).transpose()
    }

    /// [`CheckpointStore::save_checkpoint`] (compare-and-set) on the caller's connection, so a
    /// projection commits its read-model writes and its checkpoint in one transaction. On
    /// [`StoreError::CheckpointConflict`] nothing changed; roll back and re-read.
    pub async fn save_checkpoint_in(
        &self,
        conn: &mut PgConnection,
        name: &str,
        expected: Option<Position>,
        new: Position,
    ) -> Result<(), StoreError> {
        validate_checkpoint_name(name)?;
        let sequence = |p: Position| {
            i64::try_from(p.sequence).map_err(|_| out_of_range("position sequence", p.sequence))
        };
        let done = match expected {
            None => {
                sqlx::query(self.sql.insert_checkpoint.clone())
                    .bind(name)
                    .bind(new.tx.to_string())
                    .bind(sequence(new)?)
                    .execute(&mut *conn)
                    .await
            }
            Some(old) => {
                sqlx::query(self.sql.update_checkpoint.clone())
                    .bind(name)
                    .bind(new.tx.to_string())
                    .bind(sequence(new)?)
                    .bind(old.tx.to_string())
                    .bind(sequence(old)?)
                    .execute(&mut *conn)
                    .await
            }
        }
        .map_err(|e| self.fail(e))?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        Err(StoreError::CheckpointConflict {
            name: name.to_owned(),
            expected,
            actual: self.load_checkpoint_in(conn, name).await?,
        })
    }

    /// Listens for appends on this store's channel (one connection from the pool, held until the
    /// listener is dropped).
    pub async fn listen(&self) -> Result<AppendListener, StoreError> {
        AppendListener::new(&self.pool, &self.sql.channel).await
    }

    /// The visibility horizon and what holds it back: for a subscription's status ("held back by
    /// transaction N since T") when it seems stuck.
    pub async fn horizon(&self) -> Result<Horizon, StoreError> {
        let row = sqlx::query(self.sql.horizon_status.clone())
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        horizon(&row)
    }

    /// Runs a count statement: `all`, or `only` with the type names first; then each position
    /// as its `(tx, sequence)` pair.
    async fn count(
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

    /// Tells listeners (in every process) that an append committed up to `position`.
    fn announce(&self, position: Position) {
        if let Some(notifier) = self.notifier.get() {
            notifier.appended(position);
        }
        self.announcer().announce(position);
    }

    fn announcer(&self) -> &notify::Announcer {
        self.announcer
            .get_or_init(|| notify::Announcer::start(&self.pool, self.sql.clone()))
    }

    fn fail(&self, error: sqlx::Error) -> StoreError {
        map_error_in(&self.sql.schema, error)
    }

    async fn individual_append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
        batch: &append::Encoded,
        mut slot: Option<&mut group::Slot>,
    ) -> Result<AppendResult, StoreError> {
        if !self.inline.is_empty() {
            let mut tx = tx::Tx::begin(&self.pool).await?;
            let appended = append::append_on(
                tx.conn(),
                &self.sql,
                stream,
                expected,
                events,
                batch,
                append::Mode::InTransaction,
            )
            .await?;
            if appended.fresh {
                self.project_inline(tx.conn(), stream, &appended.result, events.len())
                    .await?;
            }
            tx.commit().await?;
            if appended.fresh {
                // The statement notified, delivered on this commit.
                self.announcer().notified(appended.result.position);
            }
            return Ok(appended.result);
        }
        let notifying = self.announcer().claim();
        let mode = if notifying {
            append::Mode::AloneNotifying
        } else {
            append::Mode::Alone
        };
        // A group-commit slot's connection, kept from its previous write, saves the pool's
        // round trips; the slot keeps it again if this append succeeds.
        let kept = slot.as_deref_mut().and_then(group::Slot::take_kept);
        let was_kept = kept.is_some();
        let mut conn = match kept {
            Some(conn) => conn,
            None => self.pool.acquire().await.map_err(map_error)?,
        };
        let mut result =
            append::append_on(&mut conn, &self.sql, stream, expected, events, batch, mode).await;
        if was_kept
            && matches!(
                result,
                Err(StoreError::Connection(_) | StoreError::OutcomeUnknown(_))
            )
        {
            // The kept connection went stale between two writes (it skipped the pool's health
            // check). Retrying is safe, and settles an unknown outcome: a batch that did commit
            // comes back as its original result.
            let unknown = matches!(result, Err(StoreError::OutcomeUnknown(_)));
            result = match self.pool.acquire().await {
                Ok(fresh) => {
                    conn = fresh;
                    append::append_on(&mut conn, &self.sql, stream, expected, events, batch, mode)
                        .await
                }
                Err(error) => Err(map_error(error)),
            };
            if unknown {
                result = result.map_err(still_unknown);
            }
        }
        let result = result.map(|appended| appended.result);
        if let (true, Ok(written)) = (notifying, &result) {
            self.announcer().notified(written.position);
        }
        if let (Some(slot), Ok(_)) = (slot, &result) {
            slot.keep(conn);
        }
        result
    }

    async fn read_page(
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
    async fn decode_rows(
        &self,
        mut rows: impl futures_util::Stream<Item = Result<PgRow, sqlx::Error>> + Unpin,
        limit: i64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut events = Vec::with_capacity(usize::try_from(limit).unwrap_or(0).min(1024));
        while let Some(row) = rows.try_next().await.map_err(|e| self.fail(e))? {
            events.push(row::recorded(&row)?);
        }
        Ok(events)
    }

    /// After a short read that ended at `after`: if events after it exist (they were above the
    /// horizon when read, or committed since), waits until the horizon passes them, at most
    /// `horizon_wait`. `true` if a re-read will find them.
    async fn wait_for_pending(
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

/// The error of a re-send after a write of the same events whose outcome is unknown: if the
/// re-send could not reach the store, it learned nothing, and the outcome is still unknown.
fn still_unknown(error: StoreError) -> StoreError {
    match error {
        StoreError::Connection(source) => StoreError::OutcomeUnknown(source),
        other => other,
    }
}

/// Longest checkpoint name accepted, in bytes; also the limit for the consumer names of
/// [`PostgresProjections::first_delivery`].
pub use cqrs_core::checkpoint::MAX_CHECKPOINT_NAME_LEN;

fn validate_checkpoint_name(name: &str) -> Result<(), StoreError> {
    validate_key_name("checkpoint name", name)
}

/// The core's rule for checkpoint names ([`cqrs_core::backend::validate_checkpoint_name`]),
/// for every name stored as an index key (checkpoints, first-delivery consumers).
fn validate_key_name(what: &'static str, name: &str) -> Result<(), StoreError> {
    cqrs_core::backend::validate_checkpoint_name(name).map_err(|mut invalid| {
        invalid.what = what;
        StoreError::InvalidId(invalid)
    })
}

/// The `after` cursor's sequence as a bigint; beyond `i64::MAX` nothing can follow it anyway.
fn sequence_after(after: Position) -> i64 {
    i64::try_from(after.sequence).unwrap_or(i64::MAX)
}

fn checkpoint_position(row: &PgRow) -> Result<Position, StoreError> {
    let tx: String = row.try_get("tx_text").map_err(map_error)?;
    let sequence: i64 = row.try_get("position").map_err(map_error)?;
    Ok(Position::new(
        row::parse_tx(&tx).map_err(|e| StoreError::Backend(e.into()))?,
        u64::try_from(sequence)
            .map_err(|_| StoreError::Backend(format!("negative checkpoint {sequence}").into()))?,
    ))
}

/// The visibility horizon of gap-free reads, from [`PostgresStore::horizon`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Horizon {
    /// The oldest running transaction id (`pg_snapshot_xmin`): [`EventStore::read_all`] returns
    /// only events written by transactions below it.
    pub xmin: u64,
    /// Events already committed but not yet readable because the horizon is below them.
    pub waiting_events: u64,
    /// The running transaction at the horizon, if it can be seen.
    pub held_by: Option<HorizonHolder>,
}

/// The transaction at the visibility horizon. Fields are `None` where PostgreSQL does not show them
/// to this role (`pg_stat_activity` hides other users' sessions unless `pg_read_all_stats`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HorizonHolder {
    /// Its transaction id.
    pub xid: u64,
    /// The backend process, for `pg_terminate_backend` (`None` for a prepared transaction).
    pub pid: Option<i32>,
    /// Its database (any database in the cluster holds the horizon).
    pub database: Option<String>,
    /// Its user.
    pub user: Option<String>,
    /// Its `application_name`.
    pub application_name: Option<String>,
    /// Its state (`active`, `idle in transaction`, ...).
    pub state: Option<String>,
    /// When its transaction started (for a prepared transaction: when it was prepared).
    pub since: Option<DateTime<Utc>>,
    /// The global id, if it is a prepared (two-phase) transaction.
    pub prepared_gid: Option<String>,
}

impl std::fmt::Display for Horizon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.held_by {
            None => write!(f, "horizon at transaction {}", self.xmin)?,
            Some(holder) => {
                write!(f, "held back by transaction {}", holder.xid)?;
                if let Some(since) = holder.since {
                    write!(f, " since {}", since.to_rfc3339())?;
                }
                match (&holder.prepared_gid, holder.pid) {
                    (Some(gid), _) => write!(f, " (prepared transaction `{gid}`)")?,
                    (None, Some(pid)) => {
                        write!(f, " (pid {pid}")?;
                        for (label, value) in [
                            ("database", &holder.database),
                            ("application", &holder.application_name),
                            ("state", &holder.state),
                        ] {
                            if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
                                write!(f, ", {label} {value}")?;
                            }
                        }
                        f.write_str(")")?;
                    }
                    (None, None) => {}
                }
            }
        }
        write!(f, "; {} committed events waiting", self.waiting_events)
    }
}

fn horizon(row: &PgRow) -> Result<Horizon, StoreError> {
    let get_text = |column: &str| -> Result<Option<String>, StoreError> {
        row.try_get(column).map_err(map_error)
    };
    let xmin_text: String = row.try_get("xmin").map_err(map_error)?;
    let xmin = row::parse_tx(&xmin_text).map_err(|e| StoreError::Backend(e.into()))?;
    let waiting: i64 = row.try_get("waiting").map_err(map_error)?;
    let pid: Option<i32> = row.try_get("pid").map_err(map_error)?;
    let prepared_gid = get_text("gid")?;
    let held_by = (pid.is_some() || prepared_gid.is_some())
        .then(|| -> Result<HorizonHolder, StoreError> {
            let started: Option<DateTime<Utc>> = row.try_get("xact_start").map_err(map_error)?;
            let prepared: Option<DateTime<Utc>> = row.try_get("prepared").map_err(map_error)?;
            Ok(HorizonHolder {
                xid: xmin,
                pid,
                database: get_text("datname")?,
                user: get_text("usename")?,
                application_name: get_text("application_name")?,
                state: get_text("state")?,
                since: started.or(prepared),
                prepared_gid: prepared_gid.clone(),
            })
        })
        .transpose()?;
    Ok(Horizon {
        xmin,
        waiting_events: u64::try_from(waiting).unwrap_or_default(),
        held_by,
    })
}

#[async_trait]
impl EventStore for PostgresStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let batch = Arc::new(append::encode(stream, &events)?);
        // Holding a group-commit slot while appending alone keeps this write counted as in
        // flight, so concurrent appends queue up and share the next group.
        let mut slot = None;
        let mut unsettled = false;
        if let Some(group) = self.group.as_ref().filter(|_| self.inline.is_empty()) {
            match group.append(stream, expected, &batch).await {
                group::Joined::Written(result) => {
                    self.announce(result.position);
                    return Ok(result);
                }
                // Alone (a group of one; or not settled by the group: a conflict, a retry, a
                // failed group), with the full checks, so this caller gets exactly its own result
                // or error.
                group::Joined::Alone(held) => slot = held,
                group::Joined::Unsettled => unsettled = true,
            }
        }
        let mut result = self
            .individual_append(stream, expected, &events, &batch, slot.as_mut())
            .await;
        drop(slot);
        if unsettled {
            result = result.map_err(still_unknown);
        }
        let result = result?;
        self.announce(result.position);
        Ok(result)
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: StreamVersion,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        stream.validate()?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let query = || {
            sqlx::query(self.sql.read_stream.clone())
                .bind(stream.stream_type())
                .bind(stream.id())
                .bind(i64::try_from(from.get()).unwrap_or(i64::MAX))
                .bind(limit)
        };
        // A load before a command: on a connection group commit keeps, if one is idle (no pool
        // round trips); on a connection error (the server closed it meanwhile) read from the pool.
        if let Some(group) = &self.group {
            if let Some(mut conn) = group.borrow_kept() {
                match self.decode_rows(query().fetch(&mut *conn), limit).await {
                    Ok(events) => {
                        group.give_back(conn);
                        return Ok(events);
                    }
                    Err(StoreError::Connection(_)) => {}
                    Err(other) => return Err(other),
                }
            }
        }
        self.decode_rows(query().fetch(&self.pool), limit).await
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

#[async_trait]
impl SnapshotStore for PostgresStore {
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        stream.validate()?;
        let row = sqlx::query(self.sql.load_snapshot.clone())
            .bind(stream.stream_type())
            .bind(stream.id())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        let Some(row) = row else { return Ok(None) };
        let version: i64 = row.try_get("stream_version").map_err(map_error)?;
        let snapshot_version: i64 = row.try_get("snapshot_version").map_err(map_error)?;
        let payload: String = row.try_get("payload_text").map_err(map_error)?;
        // An unreadable snapshot is no snapshot: the repository replays the stream.
        let (Ok(payload), Ok(snapshot_version), Ok(version)) = (
            serde_json::from_str(&payload),
            u32::try_from(snapshot_version),
            u64::try_from(version),
        ) else {
            tracing::warn!(%stream, "ignoring an unreadable snapshot");
            return Ok(None);
        };
        Ok(Some(Snapshot {
            stream: stream.clone(),
            stream_version: StreamVersion::new(version),
            snapshot_version,
            payload,
        }))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        snapshot.stream.validate()?;
        cqrs_core::backend::validate_snapshot(&snapshot)?;
        let version = snapshot.stream_version.get();
        sqlx::query(self.sql.save_snapshot.clone())
            .bind(snapshot.stream.stream_type())
            .bind(snapshot.stream.id())
            .bind(i64::try_from(version).map_err(|_| out_of_range("stream version", version))?)
            .bind(i64::from(snapshot.snapshot_version))
            .bind(snapshot.payload.to_string())
            .execute(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(())
    }
}

#[async_trait]
impl CheckpointStore for PostgresStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_error)?;
        self.load_checkpoint_in(&mut conn, name).await
    }

    async fn save_checkpoint(
        &self,
        name: &str,
        expected: Option<Position>,
        new: Position,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_error)?;
        self.save_checkpoint_in(&mut conn, name, expected, new)
            .await
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<(), StoreError> {
        validate_checkpoint_name(name)?;
        sqlx::query(self.sql.delete_checkpoint.clone())
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(())
    }
}
