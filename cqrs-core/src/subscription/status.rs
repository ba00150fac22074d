//! What a runner reports: its state, its last failure, progress, and why a run or a wait ended.

use std::time::Duration;

use crate::backend::BatchError;
use crate::projection::ProjectionError;
use crate::store::{Chain, StoreError};
use crate::stream::Position;

/// What a runner is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProjectionState {
    /// Started, not yet holding the lease.
    Starting,
    /// Another runner holds the lease; this one waits to take over.
    Standby,
    /// Processing or following live events.
    Running,
    /// Replaying from the start (see [`ProjectionRunner::rebuild`](crate::subscription::ProjectionRunner::rebuild)).
    Rebuilding,
    /// Stopped at the last good checkpoint by an error; retrying with backoff.
    Failed,
    /// Ended: stopped on request, or killed by a panic outside any handler (then
    /// [`ProjectionStatus::last_error`] says so). Nothing runs any more.
    Stopped,
}

/// What kind of failure stopped a projection, which decides whether it can be skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FailureCause {
    /// A handler returned an error for the event.
    Handler,
    /// The event could not be decoded into the handler's type (a failing upcaster, a payload
    /// of the wrong shape).
    Decode,
    /// A handler or an upcaster panicked on the event, or (without a position) the batch
    /// panicked outside any one handler.
    Panic,
    /// The stored row cannot be read back at all.
    CorruptEvent,
    /// The storage failed (a lost connection, a timeout, a conflict): not the event's fault, so
    /// it is retried with backoff and never offered as a poison event.
    Store,
    /// A system the projection delivers to outside its backend (a message broker, a remote
    /// service) failed or is unreachable ([`ProjectionError::Unavailable`]): not the events'
    /// fault, so it is retried with backoff and never offered as a poison event.
    Unavailable,
}

impl FailureCause {
    /// Every cause, for backends decoding a stored name.
    const ALL: [FailureCause; 6] = [
        FailureCause::Handler,
        FailureCause::Decode,
        FailureCause::Panic,
        FailureCause::CorruptEvent,
        FailureCause::Store,
        FailureCause::Unavailable,
    ];

    /// The cause's stable name, as backends store it (`"handler"`, `"corrupt_event"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            FailureCause::Handler => "handler",
            FailureCause::Decode => "decode",
            FailureCause::Panic => "panic",
            FailureCause::CorruptEvent => "corrupt_event",
            FailureCause::Store => "store",
            FailureCause::Unavailable => "unavailable",
        }
    }

    /// The cause of a stored [`FailureCause::name`]; `None` for a name this version does not
    /// know.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|cause| cause.name() == name)
    }
}

/// Why a projection is failing, as shown in [`ProjectionStatus::last_error`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[non_exhaustive]
#[error("{message}")]
pub struct ProjectionFailure {
    /// What failed.
    pub cause: FailureCause,
    /// The failing event's position, when the failure belongs to one event.
    pub position: Option<Position>,
    /// The failing event's type, when known.
    pub event_type: Option<String>,
    /// The error, as text.
    pub message: String,
}

impl ProjectionFailure {
    /// A failure (for backends reading back one they recorded).
    pub fn new(
        cause: FailureCause,
        position: Option<Position>,
        event_type: Option<String>,
        message: String,
    ) -> Self {
        Self {
            cause,
            position,
            event_type,
            message,
        }
    }

    /// Whether [`ProjectionHandle::skip`](crate::subscription::ProjectionHandle::skip) can move past it: a failure of one event (its handler,
    /// its decoding, a panic on it, its unreadable row), never a storage failure or an
    /// unavailable system.
    pub fn skippable(&self) -> bool {
        self.position.is_some()
            && !matches!(self.cause, FailureCause::Store | FailureCause::Unavailable)
    }

    pub(crate) fn of_projection(error: &ProjectionError) -> Self {
        let (cause, event_type) = match error {
            ProjectionError::Decode { .. } => (FailureCause::Decode, None),
            ProjectionError::Handler { event_type, .. } => {
                (FailureCause::Handler, Some(event_type.clone()))
            }
            ProjectionError::Panicked { event_type, .. } => {
                (FailureCause::Panic, Some(event_type.clone()))
            }
            ProjectionError::Unavailable { .. } => (FailureCause::Unavailable, None),
            // A flush belongs to the whole batch, not to one event.
            _ => (FailureCause::Handler, None),
        };
        Self {
            cause,
            position: error.position(),
            event_type,
            message: Chain(error).to_string(),
        }
    }

    pub(crate) fn of_store(error: &StoreError) -> Self {
        let (cause, position) = match error {
            StoreError::CorruptEvent { position, .. } => {
                (FailureCause::CorruptEvent, Some(*position))
            }
            _ => (FailureCause::Store, None),
        };
        Self {
            cause,
            position,
            event_type: None,
            message: Chain(error).to_string(),
        }
    }

    pub(crate) fn panic(message: &str) -> Self {
        Self {
            cause: FailureCause::Panic,
            position: None,
            event_type: None,
            message: format!("the projection panicked outside any one event's handler: {message}"),
        }
    }
}

/// A projection's last failure as its backend keeps it
/// ([`ProjectionBackend::record_failure`](crate::backend::ProjectionBackend::record_failure)), so
/// that it can be shown from another process: the runner records it when the projection fails
/// and clears it once the projection moves past it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct RecordedFailure {
    /// The projection's checkpoint name.
    pub projection: String,
    /// The failure.
    #[serde(flatten)]
    pub failure: ProjectionFailure,
    /// When it was recorded (the latest of repeated identical failures is not re-recorded).
    pub failed_at: chrono::DateTime<chrono::Utc>,
}

impl RecordedFailure {
    /// A recorded failure (for backends).
    pub fn new(
        projection: String,
        failure: ProjectionFailure,
        failed_at: chrono::DateTime<chrono::Utc>,
    ) -> Self {
        Self {
            projection,
            failure,
            failed_at,
        }
    }
}

/// A projection's status, as published by its runner.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ProjectionStatus {
    /// The checkpoint name.
    pub name: String,
    /// What the runner is doing.
    pub state: ProjectionState,
    /// The last committed position.
    pub checkpoint: Option<Position>,
    /// Events handled since the runner started.
    pub processed: u64,
    /// Events of the types it handles between the checkpoint and the head: counted when the
    /// runner takes over and when it falls behind by more than a batch, then kept up to date
    /// batch by batch (0 once caught up). `None` until first counted.
    pub lag: Option<u64>,
    /// The last failure (cleared by the next successful batch).
    pub last_error: Option<ProjectionFailure>,
}

/// Progress of a catch-up or rebuild.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Events handled so far.
    pub done: u64,
    /// Events to handle in total (counted when the catch-up started).
    pub total: u64,
    /// Events per second so far.
    pub rate: f64,
}

/// Why a [`ProjectionRunner::catch_up`](crate::subscription::ProjectionRunner::catch_up) or [`ProjectionRunner::rebuild`](crate::subscription::ProjectionRunner::rebuild) did not finish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RunError {
    /// Another runner of the projection holds its lease. A catch-up or rebuild beside a live
    /// runner would apply events twice (the rebuild resets what the live runner writes into).
    #[error("projection `{name}` is run by another runner (it holds the lease): stop it first, or build a new version under another name beside it")]
    LeaseHeld {
        /// The projection's checkpoint name.
        name: String,
    },
    /// A handler, the decoding of an event, or a flush failed; everything before it is
    /// committed.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// The batch panicked outside any one event's handler; everything before the batch is
    /// committed.
    #[error("projection `{name}` panicked outside any one event's handler: {message}")]
    Panicked {
        /// The projection's checkpoint name.
        name: String,
        /// The panic's message.
        message: String,
    },
    /// Storage failed, including [`StoreError::CorruptEvent`] (an unreadable row, at its
    /// position; everything before it is committed) and [`StoreError::NotYetReadable`] (events
    /// committed before the call are held back).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<BatchError> for RunError {
    fn from(error: BatchError) -> Self {
        match error {
            BatchError::Projection { error, .. } => RunError::Projection(error),
            BatchError::Store(error) => RunError::Store(error),
        }
    }
}

/// Why waiting for a projection failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WaitError {
    /// The projection did not reach the position in time.
    #[error("projection `{name}` did not reach position {target} within {timeout:?} (it is at {reached:?})")]
    Timeout {
        /// The projection.
        name: String,
        /// The awaited position.
        target: Position,
        /// Where it was when the wait gave up.
        reached: Option<Position>,
        /// How long the wait lasted.
        timeout: Duration,
    },
    /// Reading the checkpoint failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An event a projection skipped on a user's request ([`ProjectionHandle::skip`](crate::subscription::ProjectionHandle::skip)).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SkippedEvent {
    /// The projection's checkpoint name.
    pub projection: String,
    /// The skipped event's position.
    pub position: Position,
    /// Its type (`None` for a stored row that could not be read).
    pub event_type: Option<String>,
    /// The error it caused.
    pub reason: String,
}
