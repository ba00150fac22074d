//! Projections whose read models live in the store's file: each batch's read-model writes and its
//! checkpoint advance commit in one transaction; one runner per projection holds a file lock.

use std::sync::Arc;
use std::time::Duration;

use cqrs_core::backend::{
    check_promotion, finish_batch, BatchError, Lease, ProjectionBackend, SkipTarget,
};
use cqrs_core::subscription::{FailureCause, ProjectionFailure, RecordedFailure, SkippedEvent};
use cqrs_core::{
    CheckpointStore, EventId, EventStore, Position, Projection, RecordedEvent, StoreError,
};
use sqlx::sqlite::SqliteConnection;
use sqlx::Row;

use crate::error::to_i64;
use crate::{sql, SqliteStore};

/// A [`ProjectionBackend`] for projections whose read model is in the store's SQLite file
/// (`type Context = sqlx::SqliteConnection`): run them with
/// [`ProjectionRunner`](cqrs_core::subscription::ProjectionRunner).
///
/// - **Exactly once.** A batch runs in one `BEGIN IMMEDIATE` transaction: the checkpoint's
///   compare-and-set first, then every handler on that transaction's connection, then the
///   projection's `#[flush]`, then `COMMIT`. A crash anywhere before the commit leaves neither the
///   read-model writes nor the checkpoint. A handler error rolls the whole batch back (the runner
///   then commits the good prefix and stops before the bad event); a storage failure inside a
///   handler (a lost connection, a lock held past the busy timeout, a full disk) is reported as
///   one, retried and never offered as a poison event.
/// - **One active runner per projection** across processes: an exclusive OS lock on
///   `<database>.lease-<hash of the name>`, released when the runner stops or its process dies; a
///   standby takes over within its `standby_interval` and continues from the checkpoint.
/// - **Skips** requested with `ProjectionHandle::skip` are recorded in `projection_skips` in the
///   transaction that moves the checkpoint past the event ([`SqliteProjections::skipped_events`]).
///
/// Keep the read model's state in the database, not in the projection value. Handlers hold the
/// file's write lock while they run: appends of this process wait for the batch, appends of
/// other processes wait up to their busy timeout. So a handler writes only through the
/// connection it is given, and never appends to the store (it would wait for itself).
#[derive(Clone)]
pub struct SqliteProjections {
    /// The log the projections read (only read).
    events: Arc<dyn EventStore>,
    /// The file holding the read models, checkpoints and skips (and, beside it, the lease files).
    store: SqliteStore,
    /// Whether `events` is `store` itself, so a skip can copy the event's id and type from its row.
    events_in_file: bool,
}

impl std::fmt::Debug for SqliteProjections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteProjections")
            .field("store", &self.store)
            .field("events_in_file", &self.events_in_file)
            .finish_non_exhaustive()
    }
}

impl SqliteProjections {
    /// Projections over `store`'s events, with checkpoints, skips and read models in its file.
    pub fn new(store: SqliteStore) -> Self {
        Self {
            events: Arc::new(store.clone()),
            store,
            events_in_file: true,
        }
    }

    /// Projections that read `events` (any [`EventStore`], e.g. a PostgreSQL one: a local read
    /// replica; it is only read) with their read models, checkpoints and skips in `read_file`'s
    /// SQLite file, and the lease beside that file. The batch and its checkpoint commit in one
    /// transaction of the file, so a lost or replaced file loses the checkpoints with the read
    /// models and the projections rebuild from the start. The file's own events table is not
    /// used. Wake-ups come from `events`' [`wait_for_append`](EventStore::wait_for_append).
    pub fn with_event_source(events: Arc<dyn EventStore>, read_file: SqliteStore) -> Self {
        Self {
            events,
            store: read_file,
            events_in_file: false,
        }
    }

    /// The store whose file holds the read models (with [`SqliteProjections::new`], also the
    /// events).
    pub fn store(&self) -> &SqliteStore {
        &self.store
    }

    /// The event store the projections read.
    pub fn event_source(&self) -> &Arc<dyn EventStore> {
        &self.events
    }

    /// Every event projection `name` skipped on request, oldest first.
    pub async fn skipped_events(&self, name: &str) -> Result<Vec<SkippedEvent>, StoreError> {
        crate::validate_checkpoint_name(name)?;
        let rows = sqlx::query(sql::SKIPPED)
            .bind(name)
            .fetch_all(self.store.pool())
            .await
            .map_err(|e| self.store.fail(e))?;
        rows.iter()
            .map(|row| {
                let get = |e: sqlx::Error| StoreError::Backend(Box::new(e));
                let part = |index: usize| -> Result<u64, StoreError> {
                    let value: i64 = row.try_get(index).map_err(get)?;
                    u64::try_from(value).map_err(|_| {
                        StoreError::Backend(format!("negative position {value}").into())
                    })
                };
                let event_type: String = row.try_get(3).map_err(get)?;
                Ok(SkippedEvent {
                    projection: row.try_get(0).map_err(get)?,
                    position: Position::new(part(1)?, part(2)?),
                    // Empty: recorded from another event store that could not read the row.
                    event_type: (!event_type.is_empty()).then_some(event_type),
                    reason: row.try_get(4).map_err(get)?,
                })
            })
            .collect()
    }

    /// Projection `name`'s last recorded failure (`projection_failures`), if it has one.
    pub async fn last_failure(&self, name: &str) -> Result<Option<RecordedFailure>, StoreError> {
        crate::validate_checkpoint_name(name)?;
        let row = sqlx::query(sql::LAST_FAILURE)
            .bind(name)
            .fetch_optional(self.store.pool())
            .await
            .map_err(|e| self.store.fail(e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let get = |e: sqlx::Error| StoreError::Backend(Box::new(e));
        let cause: String = row.try_get(0).map_err(get)?;
        let cause = FailureCause::from_name(&cause).ok_or_else(|| {
            StoreError::Backend(
                format!("unknown failure cause `{cause}` recorded for `{name}`").into(),
            )
        })?;
        let part = |value: i64| {
            u64::try_from(value)
                .map_err(|_| StoreError::Backend(format!("negative position {value}").into()))
        };
        let tx: Option<i64> = row.try_get(1).map_err(get)?;
        let sequence: Option<i64> = row.try_get(2).map_err(get)?;
        let position = match (tx, sequence) {
            (Some(tx), Some(sequence)) => Some(Position::new(part(tx)?, part(sequence)?)),
            _ => None,
        };
        let micros: i64 = row.try_get(5).map_err(get)?;
        let failed_at =
            chrono::DateTime::<chrono::Utc>::from_timestamp_micros(micros).ok_or_else(|| {
                StoreError::Backend(format!("timestamp {micros} out of range").into())
            })?;
        let failure = ProjectionFailure::new(
            cause,
            position,
            row.try_get(3).map_err(get)?,
            row.try_get(4).map_err(get)?,
        );
        Ok(Some(RecordedFailure::new(
            name.to_owned(),
            failure,
            failed_at,
        )))
    }

    /// Records `failure` as projection `name`'s last failure, or clears it (`None`).
    pub async fn record_failure(
        &self,
        name: &str,
        failure: Option<&ProjectionFailure>,
    ) -> Result<(), StoreError> {
        crate::validate_checkpoint_name(name)?;
        let statement = match failure {
            Some(failure) => {
                let tx = failure
                    .position
                    .map(|p| to_i64("position", p.tx))
                    .transpose()?;
                let sequence = failure
                    .position
                    .map(|p| to_i64("position", p.sequence))
                    .transpose()?;
                sqlx::query(sql::RECORD_FAILURE)
                    .bind(name)
                    .bind(failure.cause.name())
                    .bind(tx)
                    .bind(sequence)
                    .bind(failure.event_type.clone())
                    .bind(failure.message.clone())
                    .bind(crate::row::now_micros())
            }
            None => sqlx::query(sql::CLEAR_FAILURE).bind(name),
        };
        let mut tx = self.store.begin().await?;
        statement
            .execute(tx.conn())
            .await
            .map_err(|e| self.store.fail(e))?;
        tx.commit().await
    }

    /// For handlers with effects outside the file (send an e-mail, call a service): records that
    /// `consumer` handled `event` on `conn` (the handler's transaction) and returns `true` the
    /// first time, `false` for a redelivery, which the handler then skips. Such effects are
    /// at-least-once (the effect can happen and the process die before the commit), so make them
    /// idempotent downstream where that matters.
    pub async fn first_delivery(
        &self,
        conn: &mut SqliteConnection,
        consumer: &str,
        event: EventId,
    ) -> Result<bool, StoreError> {
        crate::validate_key_name("consumer name", consumer)?;
        let done = sqlx::query(sql::FIRST_DELIVERY)
            .bind(consumer)
            .bind(&event.as_uuid().as_bytes()[..])
            .bind(crate::row::now_micros())
            .execute(conn)
            .await
            .map_err(|e| self.store.fail(e))?;
        Ok(done.rows_affected() == 1)
    }

    /// The switch of a blue/green rebuild: makes the read model built under checkpoint `built`
    /// (into the tables on the right of each pair in `tables`) the live version of projection
    /// `name` (the tables on the left), in one write transaction of the file: each live table is
    /// dropped and its built table renamed to the live name, checkpoint `name` is set to where
    /// `built` is (deleted if `built` has none) and `built` is deleted.
    ///
    /// The transaction holds the file's write lock, so it runs between two batches of a live
    /// runner, never inside one. Readers and the live runner name the live tables, so they see
    /// the new version when it commits and the old one before, never a partial one. The live
    /// runner's next batch then fails its compare-and-set (unless it was exactly where the build
    /// is), re-reads the checkpoint and continues from the build's position into the new tables:
    /// no event is lost or applied twice. The skips recorded while building become the live
    /// name's, replacing the old version's.
    ///
    /// The live version must not be ahead of the build: if checkpoint `name` is past `built`,
    /// nothing changes and the error is [`StoreError::CheckpointConflict`] (catch the build up
    /// and try again; `ProjectionRunner::rebuild_then` does).
    ///
    /// Run it while holding `built`'s lease (as `ProjectionRunner::rebuild_then` does), so that
    /// no other rebuild resets the built tables in between. Table names must match
    /// `[a-z_][a-z0-9_]*`; each built table must have the live table's columns (its indexes
    /// move with it). Returns where the live version now is.
    pub async fn promote(
        &self,
        name: &str,
        built: &str,
        tables: &[(&str, &str)],
    ) -> Result<Option<Position>, StoreError> {
        crate::validate_checkpoint_name(name)?;
        crate::validate_checkpoint_name(built)?;
        for (live, building) in tables {
            validate_table_name(live)?;
            validate_table_name(building)?;
        }
        let mut tx = self.store.begin().await?;
        let switched = async {
            let reached = self.store.load_checkpoint_in(tx.conn(), built).await?;
            let live = self.store.load_checkpoint_in(tx.conn(), name).await?;
            check_promotion(name, reached, live)?;
            for (live, building) in tables {
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP TABLE IF EXISTS \"{live}\"; ALTER TABLE \"{building}\" RENAME TO \"{live}\""
                )))
                .execute(tx.conn())
                .await
                .map_err(|e| self.store.fail(e))?;
            }
            match reached {
                Some(position) => sqlx::query(sql::SET_CHECKPOINT)
                    .bind(name)
                    .bind(to_i64("position", position.tx)?)
                    .bind(to_i64("position", position.sequence)?)
                    .bind(crate::row::now_micros())
                    .execute(tx.conn())
                    .await,
                None => sqlx::query(sql::DELETE_CHECKPOINT)
                    .bind(name)
                    .execute(tx.conn())
                    .await,
            }
            .map_err(|e| self.store.fail(e))?;
            sqlx::query(sql::DELETE_CHECKPOINT)
                .bind(built)
                .execute(tx.conn())
                .await
                .map_err(|e| self.store.fail(e))?;
            // The built version's skips become the live name's, replacing the old version's.
            sqlx::query(sql::DROP_SKIPS)
                .bind(name)
                .execute(tx.conn())
                .await
                .map_err(|e| self.store.fail(e))?;
            sqlx::query(sql::RENAME_SKIPS)
                .bind(name)
                .bind(built)
                .execute(tx.conn())
                .await
                .map_err(|e| self.store.fail(e))?;
            Ok::<_, StoreError>(reached)
        }
        .await;
        match switched {
            Ok(reached) => {
                tx.commit().await?;
                Ok(reached)
            }
            Err(error) => {
                let _ = tx.rollback().await;
                Err(error)
            }
        }
    }
}

/// The rule for a table name spliced into SQL: `[a-z_][a-z0-9_]*`, at most 63 bytes, not
/// `sqlite_*`. Such a name needs no escaping inside double quotes.
fn validate_table_name(name: &str) -> Result<(), StoreError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && !name.starts_with("sqlite_")
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if valid {
        Ok(())
    } else {
        Err(StoreError::InvalidId(cqrs_core::stream::InvalidId {
            what: "table name",
            reason: format!("`{name}` must match [a-z_][a-z0-9_]*, at most 63 bytes, not sqlite_*"),
        }))
    }
}

impl<P> ProjectionBackend<P> for SqliteProjections
where
    P: Projection<Context = SqliteConnection>,
{
    fn events(&self) -> &dyn EventStore {
        &*self.events
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
        let mut tx = self.store.begin().await?;
        if let Err(error) = self
            .store
            .save_checkpoint_in(tx.conn(), name, expected, to)
            .await
        {
            let _ = tx.rollback().await;
            return Err(error.into());
        }
        finish_batch(projection, events, tx, is_storage_failure).await
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
        // With positions `(k, k)`, the event's row key is either part.
        let key = to_i64("position", event.position.sequence)?;
        let mut tx = self.store.begin().await?;
        let recorded = async {
            self.store
                .save_checkpoint_in(tx.conn(), name, expected, event.position)
                .await?;
            let statement = sqlx::query(if self.events_in_file {
                sql::RECORD_SKIP
            } else {
                sql::RECORD_SKIP_GIVEN
            })
            .bind(name)
            .bind(to_i64("position", event.position.tx)?)
            .bind(key)
            .bind(reason)
            .bind(crate::row::now_micros());
            let statement = if self.events_in_file {
                statement
            } else {
                let id = event.event_id.map(|id| id.as_uuid().as_bytes().to_vec());
                statement
                    .bind(id.unwrap_or_default())
                    .bind(event.event_type.clone().unwrap_or_default())
            };
            statement
                .execute(tx.conn())
                .await
                .map_err(|e| self.store.fail(e))
        }
        .await;
        match recorded {
            Ok(done) if done.rows_affected() == 1 => tx.commit().await,
            Ok(_) => {
                let _ = tx.rollback().await;
                Err(StoreError::Backend(
                    format!("no event at position {} to skip", event.position).into(),
                ))
            }
            Err(error) => {
                let _ = tx.rollback().await;
                Err(error)
            }
        }
    }

    async fn skipped_events(&self, name: &str) -> Result<Vec<SkippedEvent>, StoreError> {
        SqliteProjections::skipped_events(self, name).await
    }

    async fn record_failure(
        &self,
        name: &str,
        failure: Option<&ProjectionFailure>,
    ) -> Result<(), StoreError> {
        SqliteProjections::record_failure(self, name, failure).await
    }

    async fn last_failure(&self, name: &str) -> Result<Option<RecordedFailure>, StoreError> {
        SqliteProjections::last_failure(self, name).await
    }

    async fn acquire_lease(&self, name: &str) -> Result<Option<Box<dyn Lease>>, StoreError> {
        crate::validate_checkpoint_name(name)?;
        crate::lease::acquire(self.store.path(), name, &self.store.shared.errors).await
    }

    async fn wait_for_append(&self, after: Position, timeout: Duration) {
        self.events.wait_for_append(after, timeout).await;
    }
}

/// Whether a cause of a handler's error is the storage's failure rather than the handler's: a
/// lost connection, a lock held past the busy timeout, a full disk, an I/O error.
fn is_storage_failure(cause: &(dyn std::error::Error + 'static)) -> bool {
    cause
        .downcast_ref::<sqlx::Error>()
        .is_some_and(crate::error::is_storage_failure)
}
