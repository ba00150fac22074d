//! Projections whose read models live in PostgreSQL: each batch's read-model writes and its
//! checkpoint advance commit in one transaction, one runner per projection holds an advisory lock.

use std::time::{Duration, Instant};

use cqrs_core::backend::{apply_batch, BatchError, Lease, ProjectionBackend, SkipTarget};
use cqrs_core::subscription::SkippedEvent;
use cqrs_core::{
    CheckpointStore, EventId, EventStore, Position, Projection, ProjectionError, RecordedEvent,
    StoreError,
};
use sqlx::postgres::PgConnection;
use sqlx::{Connection, Row};

use crate::error::{map_error, out_of_range};
use crate::tx::Tx;
use crate::PostgresStore;

/// How often a held lease re-checks its connection (at most; between checks it is assumed held).
const LEASE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// A lease check that takes longer than this counts as a lost connection.
const LEASE_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// A [`ProjectionBackend`] for projections whose read model is in the store's PostgreSQL database
/// (`type Context = sqlx::PgConnection`): run them with
/// [`ProjectionRunner`](cqrs_core::subscription::ProjectionRunner).
///
/// - **Exactly once.** A batch runs in one transaction: first the checkpoint's compare-and-set
///   (`UPDATE … WHERE position = <what this runner read>`, which also locks the checkpoint row),
///   then every handler on that transaction's connection, then `COMMIT`. A crash anywhere before
///   the commit leaves neither the read-model writes nor the checkpoint; a second runner that read
///   the same checkpoint waits on the row lock and then fails the compare-and-set. A handler error
///   rolls the whole batch back (the runner then commits the good prefix and stops before the bad
///   event).
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
#[derive(Debug, Clone)]
pub struct PostgresProjections {
    store: PostgresStore,
}

impl PostgresProjections {
    /// Projections over `store`'s events, with checkpoints, skips and leases in its schema.
    pub fn new(store: PostgresStore) -> Self {
        Self { store }
    }

    /// The store.
    pub fn store(&self) -> &PostgresStore {
        &self.store
    }

    /// Every event projection `name` skipped on request, oldest first.
    pub async fn skipped_events(&self, name: &str) -> Result<Vec<SkippedEvent>, StoreError> {
        let rows = sqlx::query(self.store.sql.skipped.clone())
            .bind(name)
            .fetch_all(self.store.pool())
            .await
            .map_err(|e| self.store.fail(e))?;
        rows.iter()
            .map(|row| {
                Ok(SkippedEvent {
                    projection: row.try_get("projection").map_err(map_error)?,
                    position: crate::checkpoints::checkpoint_position(row)?,
                    event_type: Some(row.try_get("event_type").map_err(map_error)?),
                    reason: row.try_get("reason").map_err(map_error)?,
                })
            })
            .collect()
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
        let done = sqlx::query(self.store.sql.first_delivery.clone())
            .bind(consumer)
            .bind(*event.as_uuid())
            .execute(conn)
            .await
            .map_err(|e| self.store.fail(e))?;
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
        let schema = &self.store.sql.quoted;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE OR REPLACE VIEW {schema}.\"{view}\" AS SELECT * FROM {schema}.\"{table}\""
        )))
        .execute(self.store.pool())
        .await
        .map_err(|e| self.store.fail(e))?;
        Ok(())
    }
}

impl<P> ProjectionBackend<P> for PostgresProjections
where
    P: Projection<Context = PgConnection>,
{
    fn events(&self) -> &dyn EventStore {
        &self.store
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        CheckpointStore::load_checkpoint(&self.store, name).await
    }

    async fn commit_batch(
        &self,
        projection: &mut P,
        name: &str,
        expected: Option<Position>,
        events: &[RecordedEvent],
        to: Position,
    ) -> Result<(), BatchError> {
        let mut tx = Tx::begin(self.store.pool()).await?;
        // The compare-and-set first: it locks the checkpoint row, so a second runner waits here
        // instead of doing the batch's work only to fail at the end.
        self.store
            .save_checkpoint_in(tx.conn(), name, expected, to)
            .await?;
        let outcome = apply_batch(projection, events, tx.conn()).await;
        if let Err((index, error)) = outcome {
            // Rolling back (or dropping `tx`) undoes the batch: nothing of it is committed (and
            // `apply_batch` discarded what the handlers buffered).
            let rolled_back = tx.rollback().await;
            return Err(match storage_failure(&error, rolled_back) {
                Some(store) => BatchError::Store(store),
                None => BatchError::Projection {
                    index,
                    committed: 0,
                    error,
                },
            });
        }
        if let Err(error) = tx.commit().await {
            projection.discard();
            return Err(error.into());
        }
        Ok(())
    }

    async fn reset_checkpoint(&self, name: &str) -> Result<(), StoreError> {
        CheckpointStore::delete_checkpoint(&self.store, name).await
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
        let mut tx = Tx::begin(self.store.pool()).await?;
        self.store
            .save_checkpoint_in(tx.conn(), name, expected, event.position)
            .await?;
        // The event's id and type come from its row: a row whose payload cannot be decoded
        // still has them.
        let recorded = sqlx::query(self.store.sql.record_skip.clone())
            .bind(name)
            .bind(event.position.tx.to_string())
            .bind(sequence)
            .bind(reason)
            .execute(tx.conn())
            .await
            .map_err(|e| self.store.fail(e))?;
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

    async fn acquire_lease(&self, name: &str) -> Result<Option<Box<dyn Lease>>, StoreError> {
        // A dedicated connection: the lock lives as long as it does, and it must never go back
        // to the pool still holding the lock.
        let options = self.store.pool().connect_options();
        let mut conn = PgConnection::connect_with(&options)
            .await
            .map_err(map_error)?;
        let held: bool = sqlx::query_scalar(self.store.sql.try_lease.clone())
            .bind(self.store.schema())
            .bind(name)
            .fetch_one(&mut conn)
            .await
            .map_err(|e| self.store.fail(e))?;
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
        self.store.wait_for_append(after, timeout).await;
    }
}

/// A handler failed: whether the failure is really the storage's (then it is retried with
/// backoff and never offered as a poison event). It is when the handler's error comes from a
/// lost connection or a transient conflict of the database (a serialization failure or a
/// deadlock, which a retry resolves), or when the batch's connection can no longer roll back.
fn storage_failure(
    error: &ProjectionError,
    rolled_back: Result<(), StoreError>,
) -> Option<StoreError> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(error);
    while let Some(cause) = source {
        if let Some(sqlx) = cause.downcast_ref::<sqlx::Error>() {
            let transient = match sqlx {
                sqlx::Error::Database(db) => {
                    matches!(db.code().as_deref(), Some("40001" | "40P01"))
                }
                _ => false,
            };
            if transient || crate::error::is_connection_error(sqlx) {
                return Some(StoreError::Connection(error.to_string().into()));
            }
        }
        source = cause.source();
    }
    match rolled_back {
        Err(lost @ StoreError::Connection(_)) => Some(lost),
        _ => None,
    }
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
