//! Projections whose read models live in PostgreSQL (the event store's database or a read database
//! of their own): each batch's read-model writes and its checkpoint advance commit in one
//! transaction of the read database, one runner per projection holds an advisory lock there.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_core::backend::{
    check_promotion, finish_batch, BatchError, Lease, ProjectionBackend, SkipTarget,
};
use cqrs_core::subscription::{FailureCause, ProjectionFailure, RecordedFailure, SkippedEvent};
use cqrs_core::{
    CheckpointStore, EventId, EventStore, Position, Projection, RecordedEvent, StoreError,
};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use crate::error::{map_error, out_of_range};
use crate::tx::Tx;
use crate::PostgresStore;

/// Begins a batch that commits without waiting for its WAL flush (see
/// [`PostgresProjections::with_synchronous_commit`]).
const BEGIN_ASYNCHRONOUS: &str = "BEGIN; SET LOCAL synchronous_commit = off";
/// Begins a batch under the server's `synchronous_commit` setting.
const BEGIN_SYNCHRONOUS: &str = "BEGIN";

/// How often a held lease re-checks its connection (at most; between checks it is assumed held).
const LEASE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// A lease check that takes longer than this counts as a lost connection.
const LEASE_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`ProjectionBackend`] for projections whose read model is in a PostgreSQL database
/// (`type Context = sqlx::PgConnection`): the event store's own
/// ([`PostgresProjections::new`]) or a read database of its own, fed from any event store
/// ([`PostgresProjections::with_event_source`]). Run them with
/// [`ProjectionRunner`](cqrs_core::subscription::ProjectionRunner).
///
/// - **Exactly once.** A batch runs in one transaction: first the checkpoint's compare-and-set
///   (`UPDATE … WHERE position = <what this runner read>`, which also locks the checkpoint row),
///   then every handler on that transaction's connection, then `COMMIT`. A crash anywhere before
///   the commit leaves neither the read-model writes nor the checkpoint; a second runner that read
///   the same checkpoint waits on the row lock and then fails the compare-and-set. A handler error
///   rolls the whole batch back (the runner then commits the good prefix and stops before the bad
///   event). Batches commit asynchronously (no disk flush each); a server crash can lose the last
///   ones, whole, and they are applied again ([`PostgresProjections::with_synchronous_commit`]).
/// - **Batched writes.** After a batch's last event the projection's `#[flush]` method runs on the
///   same transaction, so handlers can buffer rows and write them in one statement per batch; after
///   a rollback its `#[discard]` method drops the buffer.
/// - **One active runner per projection** across processes: a session advisory lock keyed by
///   `(schema, name)`, held on a dedicated connection (not from the pool) for as long as the runner
///   runs. When the process dies, PostgreSQL drops the connection and the lock; a standby runner
///   takes over within its `standby_interval` and continues from the checkpoint.
/// - **Skips** requested with `ProjectionHandle::skip` are recorded in `projection_skips` in the
///   transaction that moves the checkpoint past the event ([`PostgresProjections::skipped_events`]).
///
/// The projection value itself is not transactional: keep the read model's state in the database
/// (the struct may hold configuration, such as the table to write). Writes with effects outside
/// the database are at-least-once; de-duplicate them with [`PostgresProjections::first_delivery`].
///
/// ```no_run
/// use cqrs_core::prelude::*;
/// use cqrs_core::projection;
/// use cqrs_core::subscription::ProjectionRunner;
/// use cqrs_postgres::{PostgresProjections, PostgresStore};
/// use serde::{Deserialize, Serialize};
///
/// #[event(name = "MoneyDeposited")]
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// pub struct MoneyDeposited { pub amount: i64 }
///
/// /// Balance per account, in table `balances`.
/// #[derive(Default)]
/// pub struct Balances;
///
/// #[projection(name = "balances")]
/// impl Balances {
///     async fn deposited(
///         &mut self,
///         event: &MoneyDeposited,
///         meta: &RecordedEvent,
///         db: &mut sqlx::PgConnection,
///     ) -> Result<(), sqlx::Error> {
///         sqlx::query(
///             "INSERT INTO balances (account, balance) VALUES ($1, $2)
///              ON CONFLICT (account) DO UPDATE SET balance = balances.balance + EXCLUDED.balance",
///         )
///         .bind(meta.stream.id())
///         .bind(event.amount)
///         .execute(db)
///         .await?;
///         Ok(())
///     }
/// }
///
/// # async fn demo(store: PostgresStore) {
/// let handle = ProjectionRunner::new(Balances, PostgresProjections::new(store)).spawn();
/// # }
/// ```
#[derive(Clone)]
pub struct PostgresProjections {
    /// The log the projections read (only read).
    events: Arc<dyn EventStore>,
    /// The read database: read models, checkpoints, skips, processed events and the lease.
    read: PostgresStore,
    /// Whether `events` is `read` itself, so a skip can copy the event's id and type from its row.
    events_in_read_database: bool,
    /// What begins a batch's transaction.
    begin_batch: &'static str,
}

impl std::fmt::Debug for PostgresProjections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresProjections")
            .field("read_database", &self.read)
            .field("events_in_read_database", &self.events_in_read_database)
            .field(
                "synchronous_commit",
                &(self.begin_batch == BEGIN_SYNCHRONOUS),
            )
            .finish_non_exhaustive()
    }
}

impl PostgresProjections {
    /// Projections over `store`'s events, with checkpoints, skips and leases in its schema.
    pub fn new(store: PostgresStore) -> Self {
        Self {
            events: Arc::new(store.clone()),
            read: store,
            events_in_read_database: true,
            begin_batch: BEGIN_ASYNCHRONOUS,
        }
    }

    /// Projections that read `events` (any [`EventStore`]: another PostgreSQL database or server,
    /// SQLite, in memory; it is only read) and keep their read models, checkpoints, skips and
    /// leases in `read_database` (a pool and schema; its events table, if any, is not used).
    /// Run [`PostgresProjections::migrate`] once to create the read database's tables.
    ///
    /// - **The checkpoint lives with the read model.** Each batch's read-model writes and the
    ///   checkpoint's compare-and-set commit in one transaction of the read database, so they are
    ///   exactly once whatever the event store is. A read database that loses its data (restored
    ///   empty, dropped) loses the checkpoints with it, and the projections rebuild from the start
    ///   instead of resuming on nothing.
    /// - **The lease lives in the read database too** (a session advisory lock keyed by the read
    ///   schema and the projection name): the runners it must keep apart are the ones writing this
    ///   read model, whichever copy of the log they read, and the event store may be one that
    ///   has no locks (SQLite elsewhere, in memory) or a read-only replica. Exactness never rests
    ///   on the lease: a second runner fails the checkpoint's compare-and-set.
    /// - **Wake-ups** come from the event store's
    ///   [`wait_for_append`](EventStore::wait_for_append) (PostgreSQL's `LISTEN` on its own
    ///   database).
    /// - **Skips** are recorded with the event's id and type as the runner read them.
    pub fn with_event_source(events: Arc<dyn EventStore>, read_database: PostgresStore) -> Self {
        Self {
            events,
            read: read_database,
            events_in_read_database: false,
            begin_batch: BEGIN_ASYNCHRONOUS,
        }
    }

    /// Makes each batch's `COMMIT` wait until PostgreSQL has flushed it to disk (the server's
    /// `synchronous_commit` setting applies), instead of the default asynchronous commit.
    ///
    /// By default a batch commits with `synchronous_commit = off`: the commit returns before its
    /// WAL is flushed, so a batch costs no disk flush. Exactly-once does not depend on it: the
    /// read-model writes and the checkpoint are one transaction, which a crash of the server (or
    /// of its machine) either keeps or loses whole, and a lost batch is read and applied again
    /// from the checkpoint that survived. What a crash can cost is progress: the batches committed
    /// in the last moments before it (PostgreSQL flushes asynchronous commits within three times
    /// `wal_writer_delay`, 600 ms by default), which readers may already have seen. Use this when
    /// a batch's handlers write data that is not derived from the log, or when a reader must never
    /// see a read model step back after a server crash.
    pub fn with_synchronous_commit(mut self) -> Self {
        self.begin_batch = BEGIN_SYNCHRONOUS;
        self
    }

    /// The store whose pool and schema hold the read models, checkpoints and skips (with
    /// [`PostgresProjections::new`], also the event store).
    pub fn store(&self) -> &PostgresStore {
        &self.read
    }

    /// The event store the projections read.
    pub fn event_source(&self) -> &Arc<dyn EventStore> {
        &self.events
    }

    /// Creates or upgrades the tables projections need in the read database: with
    /// [`PostgresProjections::new`] the store's own migrations ([`PostgresStore::migrate`]); with
    /// [`PostgresProjections::with_event_source`] only `checkpoints`, `projection_skips` and
    /// `processed_events` (`read-migrations/`, history in `<schema>._cqrs_read_migrations`).
    /// Idempotent, and safe to run from several processes at once.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        if self.events_in_read_database {
            self.read.migrate().await
        } else {
            self.read.migrate_read_database().await
        }
    }

    /// Every event projection `name` skipped on request, oldest first.
    pub async fn skipped_events(&self, name: &str) -> Result<Vec<SkippedEvent>, StoreError> {
        let rows = sqlx::query(self.read.sql.skipped.clone())
            .bind(name)
            .fetch_all(self.read.pool())
            .await
            .map_err(|e| self.read.fail(e))?;
        rows.iter()
            .map(|row| {
                Ok(SkippedEvent {
                    projection: row.try_get("projection").map_err(map_error)?,
                    position: crate::checkpoints::checkpoint_position(row)?,
                    event_type: row.try_get("event_type").map_err(map_error)?,
                    reason: row.try_get("reason").map_err(map_error)?,
                })
            })
            .collect()
    }

    /// Projection `name`'s last recorded failure (`projection_failures`), if it has one.
    pub async fn last_failure(&self, name: &str) -> Result<Option<RecordedFailure>, StoreError> {
        crate::checkpoints::validate_key_name("checkpoint name", name)?;
        let row = sqlx::query(self.read.sql.last_failure.clone())
            .bind(name)
            .fetch_optional(self.read.pool())
            .await
            .map_err(|e| self.read.fail(e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let cause: String = row.try_get("cause").map_err(map_error)?;
        let cause = FailureCause::from_name(&cause).ok_or_else(|| {
            StoreError::Backend(
                format!("unknown failure cause `{cause}` recorded for `{name}`").into(),
            )
        })?;
        let tx: Option<String> = row.try_get("tx_text").map_err(map_error)?;
        let position = match tx {
            Some(_) => Some(crate::checkpoints::checkpoint_position(&row)?),
            None => None,
        };
        let failure = ProjectionFailure::new(
            cause,
            position,
            row.try_get("event_type").map_err(map_error)?,
            row.try_get("message").map_err(map_error)?,
        );
        Ok(Some(RecordedFailure::new(
            name.to_owned(),
            failure,
            row.try_get("failed_at").map_err(map_error)?,
        )))
    }

    /// Records `failure` as projection `name`'s last failure, or clears it (`None`).
    pub async fn record_failure(
        &self,
        name: &str,
        failure: Option<&ProjectionFailure>,
    ) -> Result<(), StoreError> {
        crate::checkpoints::validate_key_name("checkpoint name", name)?;
        let done = match failure {
            Some(failure) => {
                let sequence = failure
                    .position
                    .map(|p| {
                        i64::try_from(p.sequence)
                            .map_err(|_| out_of_range("position sequence", p.sequence))
                    })
                    .transpose()?;
                sqlx::query(self.read.sql.record_failure.clone())
                    .bind(name)
                    .bind(failure.cause.name())
                    .bind(failure.position.map(|p| p.tx.to_string()))
                    .bind(sequence)
                    .bind(failure.event_type.as_deref())
                    .bind(&failure.message)
                    .execute(self.read.pool())
                    .await
            }
            None => {
                sqlx::query(self.read.sql.clear_failure.clone())
                    .bind(name)
                    .execute(self.read.pool())
                    .await
            }
        };
        done.map(drop).map_err(|e| self.read.fail(e))
    }

    /// For handlers with effects outside the database (send an e-mail, call a service): records
    /// that `consumer` handled `event` on `conn` (the handler's transaction) and returns `true` the
    /// first time, `false` for a redelivery, which the handler then skips. Such effects are
    /// at-least-once — the effect can happen and the process die before the commit — so make them
    /// idempotent downstream where that matters. `consumer` follows the rule for checkpoint names
    /// (not empty, at most [`crate::MAX_CHECKPOINT_NAME_LEN`] bytes, no NUL), else
    /// [`StoreError::InvalidId`] and nothing is sent.
    pub async fn first_delivery(
        &self,
        conn: &mut PgConnection,
        consumer: &str,
        event: EventId,
    ) -> Result<bool, StoreError> {
        crate::checkpoints::validate_key_name("consumer name", consumer)?;
        let done = sqlx::query(self.read.sql.first_delivery.clone())
            .bind(consumer)
            .bind(*event.as_uuid())
            .execute(conn)
            .await
            .map_err(|e| self.read.fail(e))?;
        Ok(done.rows_affected() == 1)
    }

    /// Points `view` at `table` in one statement (`CREATE OR REPLACE VIEW view AS SELECT * FROM
    /// table`, both in the store's schema): the switch of a zero-downtime rebuild, once the new
    /// version (built under another checkpoint name, see
    /// [`ProjectionRunner::named`](cqrs_core::subscription::ProjectionRunner::named)) has caught
    /// up. Readers query the view; they see the old table until the switch commits, then the new.
    /// Both names must match `[a-z_][a-z0-9_]*`; the tables must have the same columns.
    pub async fn switch_view(&self, view: &str, table: &str) -> Result<(), StoreError> {
        crate::sql::validate_identifier("view name", view)?;
        crate::sql::validate_identifier("table name", table)?;
        let schema = &self.read.sql.quoted;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE OR REPLACE VIEW {schema}.\"{view}\" AS SELECT * FROM {schema}.\"{table}\""
        )))
        .execute(self.read.pool())
        .await
        .map_err(|e| self.read.fail(e))?;
        Ok(())
    }

    /// The switch of a blue/green rebuild: makes the read model built under checkpoint `built`
    /// (into the tables on the right of each pair in `tables`) the live version of projection
    /// `name` (the tables on the left), in one transaction of the read database:
    ///
    /// 1. locks checkpoint `name`'s row, waiting for a live batch committing on it (a live
    ///    runner's next batch then waits for this transaction), and `built`'s;
    /// 2. drops each live table and renames its built table to the live name;
    /// 3. sets checkpoint `name` to where `built` is (deletes it if `built` has none) and
    ///    deletes `built`.
    ///
    /// Readers and the live runner name the live tables, so they see the new version when this
    /// commits and the old one before, never a partial one. The live runner's next batch then
    /// fails its compare-and-set (unless it was exactly where the build is), re-reads the
    /// checkpoint and continues from the build's position into the new tables: no event is
    /// lost or applied twice. The skips recorded while building become the live name's,
    /// replacing the old version's.
    ///
    /// The live version must not be ahead of the build: if checkpoint `name` is past `built`,
    /// nothing changes and the error is [`StoreError::CheckpointConflict`] (catch the build up
    /// and try again; `ProjectionRunner::rebuild_then` does).
    ///
    /// Run it while holding `built`'s lease (as `ProjectionRunner::rebuild_then` does), so that
    /// no other rebuild resets the built tables in between. Every name must match
    /// `[a-z_][a-z0-9_]*`; each built table must have the live table's columns, and indexes
    /// named by PostgreSQL or after their table (they move with it). Objects depending on a
    /// live table (a view over it) make the drop fail: then nothing changes. Returns where the
    /// live version now is.
    pub async fn promote(
        &self,
        name: &str,
        built: &str,
        tables: &[(&str, &str)],
    ) -> Result<Option<Position>, StoreError> {
        crate::checkpoints::validate_key_name("checkpoint name", name)?;
        crate::checkpoints::validate_key_name("checkpoint name", built)?;
        for (live, building) in tables {
            crate::sql::validate_identifier("table name", live)?;
            crate::sql::validate_identifier("table name", building)?;
        }
        let schema = &self.read.sql.quoted;
        let mut tx = Tx::begin(self.read.pool()).await?;
        for checkpoint in [name, built] {
            sqlx::query(self.read.sql.lock_checkpoint.clone())
                .bind(checkpoint)
                .fetch_optional(tx.conn())
                .await
                .map_err(|e| self.read.fail(e))?;
        }
        let reached = self.read.load_checkpoint_in(tx.conn(), built).await?;
        let live = self.read.load_checkpoint_in(tx.conn(), name).await?;
        check_promotion(name, reached, live)?;
        for (live, building) in tables {
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                "DROP TABLE IF EXISTS {schema}.\"{live}\";
                 ALTER TABLE {schema}.\"{building}\" RENAME TO \"{live}\""
            )))
            .execute(tx.conn())
            .await
            .map_err(|e| self.read.fail(e))?;
        }
        match reached {
            Some(position) => {
                let sequence = i64::try_from(position.sequence)
                    .map_err(|_| out_of_range("position sequence", position.sequence))?;
                sqlx::query(self.read.sql.set_checkpoint.clone())
                    .bind(name)
                    .bind(position.tx.to_string())
                    .bind(sequence)
                    .execute(tx.conn())
                    .await
            }
            None => {
                sqlx::query(self.read.sql.delete_checkpoint.clone())
                    .bind(name)
                    .execute(tx.conn())
                    .await
            }
        }
        .map_err(|e| self.read.fail(e))?;
        sqlx::query(self.read.sql.delete_checkpoint.clone())
            .bind(built)
            .execute(tx.conn())
            .await
            .map_err(|e| self.read.fail(e))?;
        sqlx::query(self.read.sql.hand_over_skips.clone())
            .bind(name)
            .bind(built)
            .execute(tx.conn())
            .await
            .map_err(|e| self.read.fail(e))?;
        tx.commit().await?;
        Ok(reached)
    }
}

impl<P> ProjectionBackend<P> for PostgresProjections
where
    P: Projection<Context = PgConnection>,
{
    fn events(&self) -> &dyn EventStore {
        &*self.events
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        CheckpointStore::load_checkpoint(&self.read, name).await
    }

    async fn commit_batch(
        &self,
        projection: &mut P,
        name: &str,
        expected: Option<Position>,
        events: &[RecordedEvent],
        to: Position,
    ) -> Result<(), BatchError> {
        // A runner commits batch after batch: on a connection kept between them.
        let mut tx =
            Tx::begin_kept(self.read.pool(), self.read.group.as_ref(), self.begin_batch).await?;
        // The compare-and-set first: it locks the checkpoint row, so a second runner waits here
        // instead of doing the batch's work only to fail at the end.
        self.read
            .save_checkpoint_in(tx.conn(), name, expected, to)
            .await?;
        finish_batch(projection, events, tx, is_storage_failure).await
    }

    async fn reset_checkpoint(&self, name: &str) -> Result<(), StoreError> {
        CheckpointStore::delete_checkpoint(&self.read, name).await
    }

    async fn record_skip(
        &self,
        name: &str,
        expected: Option<Position>,
        event: &SkipTarget,
        reason: &str,
    ) -> Result<(), StoreError> {
        let sequence = i64::try_from(event.position.sequence)
            .map_err(|_| out_of_range("position sequence", event.position.sequence))?;
        let mut tx = Tx::begin(self.read.pool()).await?;
        self.read
            .save_checkpoint_in(tx.conn(), name, expected, event.position)
            .await?;
        let recorded = if self.events_in_read_database {
            // The event's id and type come from its row: a row whose payload cannot be decoded
            // still has them.
            sqlx::query(self.read.sql.record_skip.clone())
                .bind(name)
                .bind(event.position.tx.to_string())
                .bind(sequence)
                .bind(reason)
                .execute(tx.conn())
                .await
        } else {
            sqlx::query(self.read.sql.record_skip_given.clone())
                .bind(name)
                .bind(event.position.tx.to_string())
                .bind(sequence)
                .bind(reason)
                .bind(event.event_id.map(|id| *id.as_uuid()))
                .bind(event.event_type.as_deref())
                .execute(tx.conn())
                .await
        }
        .map_err(|e| self.read.fail(e))?;
        if recorded.rows_affected() != 1 {
            return Err(StoreError::Backend(
                format!("no event at position {} to skip", event.position).into(),
            ));
        }
        tx.commit().await
    }

    async fn skipped_events(&self, name: &str) -> Result<Vec<SkippedEvent>, StoreError> {
        PostgresProjections::skipped_events(self, name).await
    }

    async fn record_failure(
        &self,
        name: &str,
        failure: Option<&ProjectionFailure>,
    ) -> Result<(), StoreError> {
        PostgresProjections::record_failure(self, name, failure).await
    }

    async fn last_failure(&self, name: &str) -> Result<Option<RecordedFailure>, StoreError> {
        PostgresProjections::last_failure(self, name).await
    }

    async fn acquire_lease(&self, name: &str) -> Result<Option<Box<dyn Lease>>, StoreError> {
        // A dedicated connection: the lock lives as long as it does, and it must never go back
        // to the pool still holding the lock.
        let options = self.read.pool().connect_options();
        let mut conn = PgConnection::connect_with(&options)
            .await
            .map_err(map_error)?;
        let held: bool = sqlx::query_scalar(self.read.sql.try_lease.clone())
            .bind(self.read.schema())
            .bind(name)
            .fetch_one(&mut conn)
            .await
            .map_err(|e| self.read.fail(e))?;
        if !held {
            let _ = conn.close().await;
            return Ok(None);
        }
        Ok(Some(Box::new(AdvisoryLease {
            conn: Some(conn),
            checked: Instant::now(),
        })))
    }

    async fn wait_for_append(&self, after: Position, timeout: Duration) {
        self.events.wait_for_append(after, timeout).await;
    }
}

/// Whether a cause of a handler's error is the database's failure rather than the handler's: a
/// lost connection, or a transient conflict (a serialization failure or a deadlock) that a retry
/// resolves.
fn is_storage_failure(cause: &(dyn std::error::Error + 'static)) -> bool {
    let Some(error) = cause.downcast_ref::<sqlx::Error>() else {
        return false;
    };
    let transient = matches!(
        error,
        sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("40001" | "40P01"))
    );
    transient || crate::error::connection_failed(error)
}

/// A session advisory lock on its own connection; released when the connection closes (dropped
/// here, or the process dies).
struct AdvisoryLease {
    conn: Option<PgConnection>,
    checked: Instant,
}

#[async_trait::async_trait]
impl Lease for AdvisoryLease {
    async fn is_held(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        if self.checked.elapsed() < LEASE_CHECK_INTERVAL {
            return true;
        }
        match tokio::time::timeout(LEASE_CHECK_TIMEOUT, conn.ping()).await {
            Ok(Ok(())) => {
                self.checked = Instant::now();
                true
            }
            _ => {
                tracing::warn!("projection lease connection lost");
                self.conn = None;
                false
            }
        }
    }
}
