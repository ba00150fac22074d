//! What a storage crate implements to run projections, and the per-event protocol it follows.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;

use crate::event::{EventId, RecordedEvent};
use crate::projection::{Projection, ProjectionError};
use crate::store::{EventStore, StoreError};
use crate::stream::Position;

/// Holding one of these means this process runs the projection. Dropping it releases it.
#[async_trait::async_trait]
pub trait Lease: Send + Sync {
    /// Whether the lease is still held (e.g. its database connection is alive).
    async fn is_held(&mut self) -> bool;
}

/// A batch that could not be committed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BatchError {
    /// The event at `index` of the batch failed. The first `committed` events of the batch (and the
    /// checkpoint up to them) are committed; backends that commit atomically report 0.
    #[error("the event at index {index} of the batch failed ({committed} committed before it)")]
    Projection {
        /// Index of the failing event in the batch.
        index: usize,
        /// How many events of the batch were committed before it.
        committed: usize,
        /// What failed.
        #[source]
        error: ProjectionError,
    },
    /// Storage failed (including [`StoreError::CheckpointConflict`]: another runner moved it).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The event a skip moves past: one whose handler, decoding or stored row failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SkipTarget {
    /// Its position.
    pub position: Position,
    /// Its id, unless its row could not be read.
    pub event_id: Option<EventId>,
    /// Its type, unless its row could not be read.
    pub event_type: Option<String>,
}

impl SkipTarget {
    /// The target for a read event.
    pub fn of(event: &RecordedEvent) -> Self {
        Self {
            position: event.position,
            event_id: Some(event.event_id),
            event_type: Some(event.event_type.clone()),
        }
    }

    /// The target for a stored row that cannot be read (its store reported it as corrupt at
    /// `position`): neither its id nor its type is known.
    pub fn unreadable(position: Position) -> Self {
        Self {
            position,
            event_id: None,
            event_type: None,
        }
    }
}

/// What a storage backend provides to run projections with exactly-once effects on its read models.
pub trait ProjectionBackend<P: Projection>: Send + Sync + 'static {
    /// The log projections read.
    fn events(&self) -> &dyn EventStore;

    /// The projection's committed checkpoint.
    fn load_checkpoint(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Position>, StoreError>> + Send;

    /// Applies `events` in order with `projection` and moves the checkpoint `name` from `expected`
    /// to `to`, as one atomic unit where the backend allows it. `events` may be empty (a
    /// checkpoint-only advance past events the projection does not handle).
    fn commit_batch(
        &self,
        projection: &mut P,
        name: &str,
        expected: Option<Position>,
        events: &[RecordedEvent],
        to: Position,
    ) -> impl Future<Output = Result<(), BatchError>> + Send;

    /// Deletes the checkpoint `name`, so the projection replays from the start.
    fn reset_checkpoint(&self, name: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Records that `event` was skipped on a user's request, and moves the checkpoint from
    /// `expected` to it (compare-and-set, like [`ProjectionBackend::commit_batch`]).
    fn record_skip(
        &self,
        name: &str,
        expected: Option<Position>,
        event: &SkipTarget,
        reason: &str,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Every event projection `name` skipped on request ([`ProjectionBackend::record_skip`]),
    /// oldest first.
    fn skipped_events(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Vec<crate::subscription::SkippedEvent>, StoreError>> + Send;

    /// Records `failure` as projection `name`'s last failure, replacing the one recorded before,
    /// or clears it (`None`). The runner calls this, holding the lease, when the projection fails
    /// and once it moves past the failure, so that [`ProjectionBackend::last_failure`] (and an
    /// operator's tool in another process) can show it.
    fn record_failure(
        &self,
        name: &str,
        failure: Option<&crate::subscription::ProjectionFailure>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Projection `name`'s last recorded failure ([`ProjectionBackend::record_failure`]), with
    /// when it was recorded; `None` if it has none.
    fn last_failure(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<crate::subscription::RecordedFailure>, StoreError>> + Send;

    /// Tries to become the one active runner of `name`; `None` if another runner holds it.
    fn acquire_lease(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<Box<dyn Lease>>, StoreError>> + Send;

    /// Resolves when events may have been appended after `after`, or after `timeout` at the latest.
    fn wait_for_append(
        &self,
        after: Position,
        timeout: Duration,
    ) -> impl Future<Output = ()> + Send;
}

/// Applies one event with `projection`'s handler, turning a panic (in the handler, or in the
/// upcaster decoding the event) into [`ProjectionError::Panicked`]. Projection backends call
/// this for every event, so a panic fails the batch at the event's own position instead of
/// killing the runner task with its status still saying it runs.
pub async fn handle_event<P: Projection>(
    projection: &mut P,
    event: &RecordedEvent,
    context: &mut P::Context,
) -> Result<(), ProjectionError> {
    // The call itself inside the guarded future: a handler may panic before returning one.
    let handled = async { projection.handle(event, context).await };
    match AssertUnwindSafe(handled).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(panic) => Err(ProjectionError::Panicked {
            projection: P::NAME,
            event_type: event.event_type.clone(),
            position: event.position,
            message: panic_message(panic.as_ref()),
        }),
    }
}

/// Runs [`Projection::flush`], turning a panic into [`ProjectionError::Flush`].
pub async fn flush_batch<P: Projection>(
    projection: &mut P,
    context: &mut P::Context,
) -> Result<(), ProjectionError> {
    let flushed = async { projection.flush(context).await };
    match AssertUnwindSafe(flushed).catch_unwind().await {
        Ok(outcome) => outcome,
        Err(panic) => Err(ProjectionError::Flush {
            projection: P::NAME,
            source: format!("panicked: {}", panic_message(panic.as_ref())).into(),
        }),
    }
}

/// The message of a caught panic (`panic!` with a literal or a formatted string).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(message) = panic.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// The batch protocol every projection backend follows inside its atomic unit: each event through
/// [`handle_event`], then [`flush_batch`] once if the batch has events (an empty batch only moves
/// the checkpoint past events the projection does not handle). On a failure the projection's
/// buffers are discarded and the index of the failing event (the last one for a failed flush) is
/// returned with the error; the backend then undoes the batch and reports
/// [`BatchError::Projection`] with `committed: 0`, or, if it cannot undo handler effects (a read
/// model in memory), keeps the events before the failing one and reports how many.
pub async fn apply_batch<P: Projection>(
    projection: &mut P,
    events: &[RecordedEvent],
    context: &mut P::Context,
) -> Result<(), (usize, ProjectionError)> {
    for (index, event) in events.iter().enumerate() {
        if let Err(error) = handle_event(projection, event, context).await {
            projection.discard();
            return Err((index, error));
        }
    }
    if !events.is_empty() {
        if let Err(error) = flush_batch(projection, context).await {
            projection.discard();
            return Err((events.len() - 1, error));
        }
    }
    Ok(())
}

/// What a failed batch reports, once the backend has undone it (`rolled_back` is how the undo
/// went): a handler's failure that is really the storage's is a [`BatchError::Store`] (retried
/// with backoff, never offered as a poison event), anything else the projection's own failure
/// at `index`. It is the storage's when a cause in the error's source chain is a storage failure
/// by `is_storage` (the backend's driver errors: a lost connection, a lock or a transient
/// conflict a retry resolves), or when the undo itself lost the connection.
pub fn handler_failure(
    index: usize,
    error: ProjectionError,
    rolled_back: Result<(), StoreError>,
    is_storage: impl Fn(&(dyn std::error::Error + 'static)) -> bool,
) -> BatchError {
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        if is_storage(cause) {
            let chain = crate::store::Chain(&error).to_string();
            return BatchError::Store(StoreError::Connection(chain.into()));
        }
        source = cause.source();
    }
    match rolled_back {
        Err(lost @ StoreError::Connection(_)) => BatchError::Store(lost),
        _ => BatchError::Projection {
            index,
            committed: 0,
            error,
        },
    }
}

/// A projection batch's database transaction, opened by a backend (and its checkpoint
/// compare-and-set done) before [`finish_batch`] runs the handlers on it.
#[async_trait::async_trait]
pub trait BatchTransaction: Send + Sized {
    /// The connection handlers get (`Projection::Context`).
    type Conn: Send;

    /// The transaction's connection.
    fn conn(&mut self) -> &mut Self::Conn;

    /// Commits; an error means the batch may or may not be committed, and is reported as is.
    async fn commit(self) -> Result<(), StoreError>;

    /// Rolls back; an error means the connection is gone (the server rolled back with it).
    async fn rollback(self) -> Result<(), StoreError>;
}

/// The rest of a transactional backend's `commit_batch`, the same for every such backend: runs
/// the batch through [`apply_batch`] on `tx`; on a failure rolls back and reports it through
/// [`handler_failure`] (with the backend's `is_storage`), else commits. `projection`'s buffers
/// are discarded whenever the batch is not committed.
pub async fn finish_batch<P, T>(
    projection: &mut P,
    events: &[RecordedEvent],
    mut tx: T,
    is_storage: impl Fn(&(dyn std::error::Error + 'static)) -> bool,
) -> Result<(), BatchError>
where
    P: Projection,
    T: BatchTransaction<Conn = P::Context>,
{
    if let Err((index, error)) = apply_batch(projection, events, tx.conn()).await {
        // `apply_batch` discarded what the handlers buffered; the rollback undoes their writes.
        let rolled_back = tx.rollback().await;
        return Err(handler_failure(index, error, rolled_back, is_storage));
    }
    if let Err(error) = tx.commit().await {
        projection.discard();
        return Err(error.into());
    }
    Ok(())
}

/// The rule of a blue/green switch, for backends' `promote`: a version built under checkpoint
/// name `built` may replace the live version `name` only if it has read at least as far as the
/// live one (`reached >= live`, read in the switch's transaction with both checkpoints locked).
/// Otherwise the events between them would be missing from the new version: a
/// [`StoreError::CheckpointConflict`], and the caller catches the build up and tries again.
pub fn check_promotion(
    name: &str,
    reached: Option<Position>,
    live: Option<Position>,
) -> Result<(), StoreError> {
    if live > reached {
        return Err(StoreError::CheckpointConflict {
            name: name.to_owned(),
            expected: reached,
            actual: live,
        });
    }
    Ok(())
}
