//! Subscriptions: run a [`Projection`] over the global log, from its checkpoint, forever.
//!
//! A [`ProjectionRunner`] catches up in batches over the gap-free [`EventStore::read_all`], reading only
//! the event types the projection handles, then follows live appends (woken by the backend, with a
//! polling fallback so a lost wake-up only delays). Each batch and the checkpoint advance commit
//! atomically through the [`ProjectionBackend`], whose checkpoint compare-and-set means two runners
//! can never both apply a batch; a lease keeps one active runner per projection.
//!
//! Failure policy: a handler error, a panic in a handler or an upcaster, an undecodable event or an
//! unreadable stored row stops the projection right before that event (everything ahead of it is
//! committed), is logged with `tracing`, shown in [`ProjectionStatus`] with its position, and
//! retried with exponential backoff. [`ProjectionHandle::skip`] skips such a poison event
//! explicitly; the skip is recorded by the backend. A storage failure (a lost connection) is
//! retried the same way but is never offered as a skippable event. Nothing is swallowed silently.

use std::future::Future;
use std::num::NonZeroUsize;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::event::{EventId, RecordedEvent};
use crate::projection::{flush_batch, handle_event, Projection, ProjectionError};
use crate::store::{EventStore, EventTypes, StoreError};
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
    #[error("{error}")]
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
    /// Replaying from the start (see [`ProjectionRunner::rebuild`]).
    Rebuilding,
    /// Stopped at the last good checkpoint by an error; retrying with backoff.
    Failed,
    /// Ended: stopped on request, or killed by a panic outside any handler (then
    /// [`ProjectionStatus::last_error`] says so). Nothing runs any more.
    Stopped,
}

/// What kind of failure stopped a projection, which decides whether it can be skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

/// Why a projection is failing, as shown in [`ProjectionStatus::last_error`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
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
    /// Whether [`ProjectionHandle::skip`] can move past it: a failure of one event (its handler,
    /// its decoding, a panic on it, its unreadable row), never a storage failure.
    pub fn skippable(&self) -> bool {
        self.position.is_some() && self.cause != FailureCause::Store
    }

    fn of_projection(error: &ProjectionError) -> Self {
        let (cause, event_type) = match error {
            ProjectionError::Decode { .. } => (FailureCause::Decode, None),
            ProjectionError::Handler { event_type, .. } => {
                (FailureCause::Handler, Some(event_type.clone()))
            }
            ProjectionError::Panicked { event_type, .. } => {
                (FailureCause::Panic, Some(event_type.clone()))
            }
            // A flush belongs to the whole batch, not to one event.
            _ => (FailureCause::Handler, None),
        };
        Self {
            cause,
            position: error.position(),
            event_type,
            message: error.to_string(),
        }
    }

    fn of_store(error: &StoreError) -> Self {
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
            message: error.to_string(),
        }
    }

    fn panic(message: &str) -> Self {
        Self {
            cause: FailureCause::Panic,
            position: None,
            event_type: None,
            message: format!("the projection panicked outside any one event's handler: {message}"),
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

/// Tuning for a [`ProjectionRunner`], built (and checked) by [`RunnerConfig::builder`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerConfig {
    batch_size: NonZeroUsize,
    poll_interval: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
    standby_interval: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: NonZeroUsize::new(500).unwrap_or(NonZeroUsize::MIN),
            poll_interval: Duration::from_secs(1),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            standby_interval: Duration::from_secs(1),
        }
    }
}

impl RunnerConfig {
    /// Starts from the defaults (500 events per batch, a 1 s polling fallback, backoff from
    /// 100 ms to 30 s, a standby retrying the lease every second).
    pub fn builder() -> RunnerConfigBuilder {
        let defaults = Self::default();
        RunnerConfigBuilder {
            batch_size: defaults.batch_size.get(),
            poll_interval: defaults.poll_interval,
            initial_backoff: defaults.initial_backoff,
            max_backoff: defaults.max_backoff,
            standby_interval: defaults.standby_interval,
        }
    }

    /// Events per batch (and per transaction).
    pub fn batch_size(&self) -> usize {
        self.batch_size.get()
    }

    /// Longest wait for a wake-up before polling anyway.
    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// First retry delay after a failure; doubles up to [`RunnerConfig::max_backoff`].
    pub fn initial_backoff(&self) -> Duration {
        self.initial_backoff
    }

    /// Longest retry delay.
    pub fn max_backoff(&self) -> Duration {
        self.max_backoff
    }

    /// How often a standby runner tries to take the lease.
    pub fn standby_interval(&self) -> Duration {
        self.standby_interval
    }
}

/// Builds a [`RunnerConfig`]; [`RunnerConfigBuilder::build`] rejects values a runner cannot
/// work with.
#[derive(Debug, Clone)]
pub struct RunnerConfigBuilder {
    batch_size: usize,
    poll_interval: Duration,
    initial_backoff: Duration,
    max_backoff: Duration,
    standby_interval: Duration,
}

impl RunnerConfigBuilder {
    /// Events per batch (and per transaction); at least 1.
    pub fn batch_size(mut self, events: usize) -> Self {
        self.batch_size = events;
        self
    }

    /// Longest wait for a wake-up before polling anyway; more than zero.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }

    /// First retry delay after a failure; more than zero.
    pub fn initial_backoff(mut self, delay: Duration) -> Self {
        self.initial_backoff = delay;
        self
    }

    /// Longest retry delay; at least the initial backoff.
    pub fn max_backoff(mut self, delay: Duration) -> Self {
        self.max_backoff = delay;
        self
    }

    /// How often a standby runner tries to take the lease; more than zero.
    pub fn standby_interval(mut self, interval: Duration) -> Self {
        self.standby_interval = interval;
        self
    }

    /// The configuration, or what is wrong with it.
    pub fn build(self) -> Result<RunnerConfig, InvalidConfig> {
        let invalid = |setting: &'static str, reason: &str| InvalidConfig {
            setting,
            reason: reason.to_owned(),
        };
        let batch_size = NonZeroUsize::new(self.batch_size).ok_or_else(|| {
            invalid(
                "batch_size",
                "must be at least 1 (a batch of 0 events would move the checkpoint over events it never applied)",
            )
        })?;
        for (setting, value) in [
            ("poll_interval", self.poll_interval),
            ("initial_backoff", self.initial_backoff),
            ("standby_interval", self.standby_interval),
        ] {
            if value.is_zero() {
                return Err(invalid(setting, "must be more than zero"));
            }
        }
        if self.max_backoff < self.initial_backoff {
            return Err(invalid("max_backoff", "must be at least initial_backoff"));
        }
        Ok(RunnerConfig {
            batch_size,
            poll_interval: self.poll_interval,
            initial_backoff: self.initial_backoff,
            max_backoff: self.max_backoff,
            standby_interval: self.standby_interval,
        })
    }
}

/// A [`RunnerConfig`] setting a runner cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid projection runner configuration: `{setting}` {reason}")]
#[non_exhaustive]
pub struct InvalidConfig {
    /// The setting.
    pub setting: &'static str,
    /// What is wrong with its value.
    pub reason: String,
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

/// Why a [`ProjectionRunner::catch_up`] or [`ProjectionRunner::rebuild`] did not finish.
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

enum Control {
    Stop,
    Skip(Position),
}

/// How a runner reads the log. While most events are of types the projection handles, reading
/// the whole log and dropping the rest here is cheaper than the store's type-filtered read (one
/// index range per type, merged); once a batch shows that fewer than half are handled, the runner
/// switches to the filtered read for good. Both reads return the same handled events in the same
/// order, so the choice only changes speed.
#[derive(Debug, Clone, Copy)]
struct LogReader {
    handled: &'static [&'static str],
    whole_log: bool,
}

impl LogReader {
    fn new(handled: &'static [&'static str]) -> Self {
        Self {
            handled,
            whole_log: true,
        }
    }

    /// What to ask the store for.
    fn types(self) -> EventTypes<'static> {
        if self.whole_log {
            EventTypes::All
        } else {
            EventTypes::Only(self.handled)
        }
    }

    /// Keeps the handled events of a batch read with [`LogReader::types`], and picks the read for
    /// the next batches.
    fn keep_handled(&mut self, events: &mut Vec<RecordedEvent>) {
        if !self.whole_log {
            return;
        }
        let read = events.len();
        let handled = EventTypes::Only(self.handled);
        events.retain(|e| handled.matches(&e.event_type));
        if events.len() * 2 < read {
            self.whole_log = false;
        }
    }
}

/// Events read after a cursor.
struct Page {
    events: Vec<RecordedEvent>,
    /// `false`: the page ends early, right before a row that cannot be decoded.
    complete: bool,
}

/// Reads a page of the log after `after`. A row that cannot be decoded fails the store's whole
/// read, so the page is read again up to just before it (`complete: false`): the events ahead of
/// a corrupt row still commit, and the row itself fails at its own position, where it can be
/// skipped. Only when it is the first row is its error returned.
async fn read_page(
    store: &dyn EventStore,
    after: Position,
    types: EventTypes<'_>,
    limit: usize,
) -> Result<Page, StoreError> {
    match store.read_all(after, types, limit).await {
        Ok(events) => Ok(Page {
            events,
            complete: true,
        }),
        Err(StoreError::CorruptEvent { position, reason }) => {
            // The read that failed matched the row with this filter, so the count includes it.
            let ahead = store
                .count_between(after, position, types)
                .await?
                .saturating_sub(1);
            let ahead = usize::try_from(ahead).unwrap_or(usize::MAX).min(limit);
            if ahead == 0 {
                return Err(StoreError::CorruptEvent { position, reason });
            }
            let events = store.read_all(after, types, ahead).await?;
            Ok(Page {
                events,
                complete: false,
            })
        }
        Err(other) => Err(other),
    }
}

/// The head, then the page after a cursor: what one step of a runner reads.
type BatchRead = Result<(Option<Position>, Page), StoreError>;

async fn read_batch(
    store: &dyn EventStore,
    after: Position,
    types: EventTypes<'_>,
    limit: usize,
) -> BatchRead {
    let head = store.head().await?;
    let page = read_page(store, after, types, limit).await?;
    Ok((head, page))
}

/// Commits a batch through `backend`, turning a panic that escapes the backend (outside the
/// per-event guard, [`crate::projection::handle_event`]) into an error: the projection's
/// buffers are discarded, as after any abandoned batch.
async fn commit_guarded<P: Projection, B: ProjectionBackend<P>>(
    backend: &B,
    projection: &mut P,
    name: &str,
    expected: Option<Position>,
    events: &[RecordedEvent],
    to: Position,
) -> Result<Result<(), BatchError>, String> {
    let commit = async {
        backend
            .commit_batch(projection, name, expected, events, to)
            .await
    };
    let outcome = AssertUnwindSafe(commit).catch_unwind().await;
    outcome.map_err(|panic| {
        projection.discard();
        crate::projection::panic_message(panic.as_ref())
    })
}

/// Runs one projection; see the module docs.
pub struct ProjectionRunner<P: Projection, B> {
    projection: P,
    backend: Arc<B>,
    name: String,
    config: RunnerConfig,
    /// A skip requested while the runner was waiting; handled at the top of the loop.
    pending_skip: Option<Position>,
}

impl<P: Projection, B> std::fmt::Debug for ProjectionRunner<P, B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionRunner")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl<P: Projection, B: ProjectionBackend<P>> ProjectionRunner<P, B> {
    /// A runner for `projection` on `backend`, checkpointed under [`Projection::NAME`].
    pub fn new(projection: P, backend: B) -> Self {
        Self::with_backend(projection, Arc::new(backend))
    }

    /// A runner sharing a backend with other runners.
    pub fn with_backend(projection: P, backend: Arc<B>) -> Self {
        Self {
            projection,
            backend,
            name: P::NAME.to_owned(),
            config: RunnerConfig::default(),
            pending_skip: None,
        }
    }

    /// Checkpoints under another name: a new version of a projection building beside the old one
    /// (zero-downtime rebuild), or one projection type run for several read models.
    pub fn named(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Replaces the tuning.
    pub fn with_config(mut self, config: RunnerConfig) -> Self {
        self.config = config;
        self
    }

    /// Processes every event committed before the call, reporting progress after each batch, and
    /// returns the projection.
    ///
    /// It takes the projection's lease for its duration and fails with [`RunError::LeaseHeld`]
    /// if another runner holds it. It returns `Ok` only once every event committed before the
    /// call is applied: on PostgreSQL, events held back by an older running transaction are
    /// waited for (boundedly), then it fails with [`StoreError::NotYetReadable`] naming the
    /// holder rather than return a read model with events missing.
    pub async fn catch_up(mut self, progress: impl FnMut(Progress) + Send) -> Result<P, RunError> {
        let lease = self.take_lease().await?;
        self.catch_up_leased(progress).await?;
        drop(lease);
        Ok(self.projection)
    }

    /// Resets the checkpoint and replays everything into `fresh` (an empty read model), reporting
    /// progress. `reset` clears the old read model first (e.g. truncates its tables); it runs before
    /// the checkpoint is deleted so a crash in between only causes a second, clean rebuild.
    ///
    /// Like [`ProjectionRunner::catch_up`] it holds the projection's lease throughout, so no
    /// live runner of the same name writes beside it (a live runner fails the rebuild with
    /// [`RunError::LeaseHeld`]: stop it, or rebuild a new version under another name beside it
    /// and switch readers over), and it returns only when every event committed before the call
    /// is applied.
    pub async fn rebuild<F, Fut>(
        mut self,
        fresh: P,
        reset: F,
        progress: impl FnMut(Progress) + Send,
    ) -> Result<P, RunError>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<(), StoreError>> + Send,
    {
        let lease = self.take_lease().await?;
        self.projection = fresh;
        reset().await?;
        self.backend.reset_checkpoint(&self.name).await?;
        self.catch_up_leased(progress).await?;
        drop(lease);
        Ok(self.projection)
    }

    async fn take_lease(&self) -> Result<Box<dyn Lease>, RunError> {
        self.backend
            .acquire_lease(&self.name)
            .await?
            .ok_or_else(|| RunError::LeaseHeld {
                name: self.name.clone(),
            })
    }

    /// The catch-up itself, with the lease held by the caller.
    async fn catch_up_leased(
        &mut self,
        mut progress: impl FnMut(Progress) + Send,
    ) -> Result<(), RunError> {
        let store = self.backend.events();
        let Some(target) = store.committed_head().await? else {
            return Ok(());
        };
        store.wait_until_readable(target).await?;
        let mut checkpoint = self.backend.load_checkpoint(&self.name).await?;
        let types = EventTypes::Only(P::EVENT_TYPES);
        let after = checkpoint.unwrap_or(Position::START);
        if after >= target {
            return Ok(());
        }
        // Up to `target` only: writers may append while this runs.
        let total = store.count_between(after, target, types).await?;
        let started = Instant::now();
        let mut done = 0u64;
        let limit = self.config.batch_size();
        let mut reader = LogReader::new(P::EVENT_TYPES);
        let mut next = Some(read_page(store, after, reader.types(), limit).await?);
        while let Some(Page {
            mut events,
            complete,
        }) = next.take()
        {
            let read = events.len();
            events.retain(|e| e.position <= target);
            // Everything up to `target` is readable, so a short complete page ends at it.
            let at_target = events.len() < read || (complete && read < limit);
            let to = match events.last() {
                Some(last) if !at_target => last.position,
                _ => target,
            };
            reader.keep_handled(&mut events);
            let commit = commit_guarded(
                &*self.backend,
                &mut self.projection,
                &self.name,
                checkpoint,
                &events,
                to,
            );
            let committed = if to < target {
                // Read the next batch while this one commits: the read depends only on `to`, and
                // is dropped unused if the commit fails.
                let read = read_page(store, to, reader.types(), limit);
                let (committed, read) = futures_util::future::join(commit, read).await;
                if matches!(committed, Ok(Ok(()))) {
                    next = Some(read?);
                }
                committed
            } else {
                commit.await
            };
            committed
                .map_err(|message| RunError::Panicked {
                    name: self.name.clone(),
                    message,
                })?
                .map_err(RunError::from)?;
            checkpoint = Some(to);
            done += events.len() as u64;
            progress(Progress {
                done,
                total,
                rate: done as f64 / started.elapsed().as_secs_f64().max(1e-9),
            });
        }
        Ok(())
    }

    /// Starts the runner on the tokio runtime and returns its handle.
    pub fn spawn(self) -> ProjectionHandle<P> {
        let (status_tx, status_rx) = watch::channel(ProjectionStatus {
            name: self.name.clone(),
            state: ProjectionState::Starting,
            checkpoint: None,
            processed: 0,
            lag: None,
            last_error: None,
        });
        let (control_tx, control_rx) = mpsc::channel(8);
        let span = tracing::info_span!("projection", name = %self.name);
        let shared = {
            let backend = Arc::clone(&self.backend);
            let name = self.name.clone();
            let probe: CheckpointProbe = Arc::new(move || {
                let backend = Arc::clone(&backend);
                let name = name.clone();
                Box::pin(
                    async move { ProjectionBackend::<P>::load_checkpoint(&*backend, &name).await },
                )
            });
            probe
        };
        let task = tokio::spawn(
            async move {
                let run = AssertUnwindSafe(self.run(&status_tx, control_rx));
                match run.catch_unwind().await {
                    Ok(projection) => Some(projection),
                    Err(panic) => {
                        // The runner is gone: its status must not say it runs.
                        let message = crate::projection::panic_message(panic.as_ref());
                        tracing::error!(%message, "projection runner panicked and stopped");
                        status_tx.send_modify(|s| {
                            s.state = ProjectionState::Stopped;
                            s.last_error = Some(ProjectionFailure::panic(&message));
                        });
                        None
                    }
                }
            }
            .instrument(span),
        );
        ProjectionHandle {
            status: status_rx,
            control: control_tx,
            shared,
            task: Some(task),
        }
    }

    async fn run(
        mut self,
        status: &watch::Sender<ProjectionStatus>,
        mut control: mpsc::Receiver<Control>,
    ) -> P {
        let mut reader = LogReader::new(P::EVENT_TYPES);
        let limit = self.config.batch_size();
        // The next batch, read while the previous one committed: (its cursor, what was read).
        let mut ahead: Option<(Position, BatchRead)> = None;
        let mut lease: Option<Box<dyn Lease>> = None;
        let mut checkpoint: Option<Position> = None;
        let mut backoff = self.config.initial_backoff();
        // The event the runner is failing on, while the failure is skippable.
        let mut failed_at: Option<SkipTarget> = None;
        loop {
            while let Ok(message) = control.try_recv() {
                match message {
                    Control::Stop => return self.stopped(status),
                    Control::Skip(position) => self.pending_skip = Some(position),
                }
            }
            if let Some(position) = self.pending_skip.take() {
                if let Some(target) = failed_at.take_if(|t| t.position == position) {
                    let reason = status
                        .borrow()
                        .last_error
                        .as_ref()
                        .map_or_else(String::new, |e| e.message.clone());
                    match self
                        .backend
                        .record_skip(&self.name, checkpoint, &target, &reason)
                        .await
                    {
                        Ok(()) => {
                            tracing::warn!(%position, event_type = ?target.event_type, %reason,
                                "event skipped on request");
                            checkpoint = Some(position);
                            backoff = self.config.initial_backoff();
                            status.send_modify(|s| {
                                s.checkpoint = checkpoint;
                                s.state = ProjectionState::Running;
                                s.last_error = None;
                            });
                        }
                        Err(error) => {
                            failed_at = Some(target);
                            tracing::error!(%error, "recording a skip failed");
                        }
                    }
                } else {
                    tracing::warn!(%position, "skip requested for an event that is not failing; ignored");
                }
            }

            let held = match lease.as_mut() {
                Some(l) => l.is_held().await,
                None => false,
            };
            if !held {
                lease = None;
                match self.backend.acquire_lease(&self.name).await {
                    Ok(Some(acquired)) => {
                        lease = Some(acquired);
                        match self.backend.load_checkpoint(&self.name).await {
                            Ok(c) => checkpoint = c,
                            Err(error) => {
                                lease = None;
                                self.failed(status, ProjectionFailure::of_store(&error));
                                if self.pause(&mut control, &mut backoff).await {
                                    return self.stopped(status);
                                }
                                continue;
                            }
                        }
                        tracing::info!(checkpoint = ?checkpoint, "lease acquired");
                        let lag = Self::count_lag(&self.backend, checkpoint).await;
                        status.send_modify(|s| {
                            s.state = ProjectionState::Running;
                            s.checkpoint = checkpoint;
                            s.lag = lag;
                        });
                    }
                    Ok(None) => {
                        status.send_modify(|s| s.state = ProjectionState::Standby);
                        if self
                            .sleep_or_stop(&mut control, self.config.standby_interval())
                            .await
                        {
                            return self.stopped(status);
                        }
                        continue;
                    }
                    Err(error) => {
                        self.failed(status, ProjectionFailure::of_store(&error));
                        if self.pause(&mut control, &mut backoff).await {
                            return self.stopped(status);
                        }
                        continue;
                    }
                }
            }

            let after = checkpoint.unwrap_or(Position::START);
            let store = self.backend.events();
            let batch = match ahead.take().filter(|(cursor, _)| *cursor == after) {
                Some((_, read)) => read,
                None => read_batch(store, after, reader.types(), limit).await,
            };
            let batch = match batch {
                Ok(batch) => batch,
                Err(error) => {
                    let failure = ProjectionFailure::of_store(&error);
                    // An unreadable row right after the checkpoint is this projection's poison
                    // event: skippable at its position like a failing handler.
                    failed_at = failure.position.map(|position| SkipTarget {
                        position,
                        event_id: None,
                        event_type: None,
                    });
                    self.failed(status, failure);
                    if self.pause(&mut control, &mut backoff).await {
                        return self.stopped(status);
                    }
                    continue;
                }
            };
            let (
                head,
                Page {
                    mut events,
                    complete,
                },
            ) = batch;
            // A short, complete batch read after `head` was taken means every event up to `head`
            // has been seen. A batch cut short before an unreadable row has not.
            let caught_up = complete && events.len() < limit;
            let last = events.last().map(|e| e.position);
            let to = if caught_up { last.max(head) } else { last }.unwrap_or(after);
            reader.keep_handled(&mut events);
            if events.is_empty() && to <= after {
                if self.wait_or_stop(&mut control, after).await {
                    return self.stopped(status);
                }
                continue;
            }
            let commit = commit_guarded(
                &*self.backend,
                &mut self.projection,
                &self.name,
                checkpoint,
                &events,
                to,
            );
            let outcome = if caught_up {
                commit.await
            } else {
                // Behind: read the next batch while this one commits.
                let read = read_batch(store, to, reader.types(), limit);
                let (outcome, read) = futures_util::future::join(commit, read).await;
                if matches!(outcome, Ok(Ok(()))) {
                    ahead = Some((to, read));
                }
                outcome
            };
            let outcome = match outcome {
                Ok(outcome) => outcome,
                Err(message) => {
                    // Not attributable to one event: retried with backoff, not skippable.
                    failed_at = None;
                    self.failed(status, ProjectionFailure::panic(&message));
                    if self.pause(&mut control, &mut backoff).await {
                        return self.stopped(status);
                    }
                    continue;
                }
            };
            match outcome {
                Ok(()) => {
                    checkpoint = Some(to);
                    backoff = self.config.initial_backoff();
                    failed_at = None;
                    let previous = status.borrow().lag;
                    let lag = match previous {
                        _ if caught_up => Some(0),
                        // Was caught up, now a full batch: a burst; count how far behind.
                        Some(0) | None => Self::count_lag(&self.backend, checkpoint).await,
                        Some(lag) => Some(lag.saturating_sub(events.len() as u64)),
                    };
                    status.send_modify(|s| {
                        s.state = ProjectionState::Running;
                        s.checkpoint = checkpoint;
                        s.processed += events.len() as u64;
                        s.lag = lag;
                        s.last_error = None;
                    });
                }
                Err(BatchError::Projection {
                    index,
                    committed,
                    error,
                }) => {
                    // Commit the good prefix, so the projection stops right before the bad event.
                    let mut good = committed;
                    if committed > 0 {
                        checkpoint = Some(events[committed - 1].position);
                    }
                    if index > committed {
                        let prefix = &events[committed..index];
                        let to = prefix[prefix.len() - 1].position;
                        let prefix_committed = commit_guarded(
                            &*self.backend,
                            &mut self.projection,
                            &self.name,
                            checkpoint,
                            prefix,
                            to,
                        )
                        .await;
                        if matches!(prefix_committed, Ok(Ok(()))) {
                            checkpoint = Some(to);
                            good = index;
                        }
                    }
                    status.send_modify(|s| {
                        s.checkpoint = checkpoint;
                        s.processed += good as u64;
                        s.lag = s.lag.map(|lag| lag.saturating_sub(good as u64));
                    });
                    let failure = ProjectionFailure::of_projection(&error);
                    failed_at = failure.skippable().then(|| SkipTarget::of(&events[index]));
                    self.failed(status, failure);
                    if self.pause(&mut control, &mut backoff).await {
                        return self.stopped(status);
                    }
                }
                Err(BatchError::Store(StoreError::CheckpointConflict { actual, .. })) => {
                    tracing::warn!(?actual, "checkpoint moved by another runner; re-reading");
                    checkpoint = actual;
                    lease = None;
                }
                Err(BatchError::Store(error)) => {
                    failed_at = None;
                    self.failed(status, ProjectionFailure::of_store(&error));
                    if self.pause(&mut control, &mut backoff).await {
                        return self.stopped(status);
                    }
                }
            }
        }
    }

    /// Events of this projection's types after `checkpoint`; `None` if counting failed (the
    /// status then shows no lag rather than a wrong one).
    async fn count_lag(backend: &B, checkpoint: Option<Position>) -> Option<u64> {
        let after = checkpoint.unwrap_or(Position::START);
        match backend
            .events()
            .count_after(after, EventTypes::Only(P::EVENT_TYPES))
            .await
        {
            Ok(lag) => Some(lag),
            Err(error) => {
                tracing::debug!(%error, "counting the lag failed");
                None
            }
        }
    }

    fn failed(&self, status: &watch::Sender<ProjectionStatus>, failure: ProjectionFailure) {
        tracing::error!(position = ?failure.position, cause = ?failure.cause, error = %failure.message,
            "projection failed; retrying with backoff");
        status.send_modify(|s| {
            s.state = ProjectionState::Failed;
            s.last_error = Some(failure);
        });
    }

    fn stopped(self, status: &watch::Sender<ProjectionStatus>) -> P {
        status.send_modify(|s| s.state = ProjectionState::Stopped);
        self.projection
    }

    /// Sleeps for the current backoff (doubling it); true if a stop was requested meanwhile.
    async fn pause(
        &mut self,
        control: &mut mpsc::Receiver<Control>,
        backoff: &mut Duration,
    ) -> bool {
        let delay = *backoff;
        *backoff = (*backoff * 2).min(self.config.max_backoff());
        self.until_stop(control, tokio::time::sleep(delay)).await
    }

    async fn sleep_or_stop(
        &mut self,
        control: &mut mpsc::Receiver<Control>,
        delay: Duration,
    ) -> bool {
        self.until_stop(control, tokio::time::sleep(delay)).await
    }

    async fn wait_or_stop(
        &mut self,
        control: &mut mpsc::Receiver<Control>,
        after: Position,
    ) -> bool {
        let backend = Arc::clone(&self.backend);
        let wake = backend.wait_for_append(after, self.config.poll_interval());
        self.until_stop(control, wake).await
    }

    /// Waits for `wait` or a control message: true if the runner must stop. A skip request ends the
    /// wait and is handled at the top of the loop.
    async fn until_stop(
        &mut self,
        control: &mut mpsc::Receiver<Control>,
        wait: impl Future<Output = ()>,
    ) -> bool {
        tokio::select! {
            () = wait => false,
            message = control.recv() => match message {
                None | Some(Control::Stop) => true,
                Some(Control::Skip(position)) => {
                    self.pending_skip = Some(position);
                    false
                }
            },
        }
    }
}

/// Reads a projection's committed checkpoint from its backend (for a handle whose runner does
/// not hold the lease: the active runner may be elsewhere).
type CheckpointProbe = Arc<
    dyn Fn() -> futures_util::future::BoxFuture<'static, Result<Option<Position>, StoreError>>
        + Send
        + Sync,
>;

/// Controls a spawned [`ProjectionRunner`] and observes its status.
pub struct ProjectionHandle<P> {
    status: watch::Receiver<ProjectionStatus>,
    control: mpsc::Sender<Control>,
    shared: CheckpointProbe,
    task: Option<JoinHandle<Option<P>>>,
}

impl<P> std::fmt::Debug for ProjectionHandle<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionHandle")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl<P: Projection> ProjectionHandle<P> {
    /// The latest published status.
    pub fn status(&self) -> ProjectionStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status changes (for an error channel or a health endpoint).
    pub fn watch_status(&self) -> watch::Receiver<ProjectionStatus> {
        self.status.clone()
    }

    /// Waits until the projection has committed `position` (or anything after it). While this
    /// runner holds the lease its own status answers; otherwise (a standby, or a runner that
    /// failed or stopped) the checkpoint in the backend answers, which the active runner, maybe
    /// in another process, moves. Times out cleanly.
    pub async fn wait_for(&self, position: Position, timeout: Duration) -> Result<(), WaitError> {
        let deadline = Instant::now() + timeout;
        let mut status = self.status.clone();
        let mut interval = Duration::from_millis(2);
        let mut shared = None;
        loop {
            let (local, active) = {
                let s = status.borrow_and_update();
                let active = matches!(
                    s.state,
                    ProjectionState::Running | ProjectionState::Rebuilding
                );
                (s.checkpoint, active)
            };
            if local.is_some_and(|c| c >= position) {
                return Ok(());
            }
            if !active {
                shared = (self.shared)().await?;
                if shared.is_some_and(|c| c >= position) {
                    return Ok(());
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitError::Timeout {
                    name: status.borrow().name.clone(),
                    target: position,
                    reached: local.max(shared),
                    timeout,
                });
            }
            let left = deadline - now;
            let runner_alive = status.has_changed().is_ok();
            if active && runner_alive {
                tokio::select! {
                    _ = status.changed() => {}
                    () = tokio::time::sleep(left) => {}
                }
            } else {
                tokio::time::sleep(interval.min(left)).await;
                interval = (interval * 2).min(Duration::from_millis(50));
            }
        }
    }

    /// Skips the event at `position`, which must be the event the projection is failing on, with
    /// a skippable failure ([`ProjectionFailure::skippable`]). The backend records the skip.
    pub async fn skip(&self, position: Position) {
        // A closed channel means the runner ended; nothing left to skip.
        let _ = self.control.send(Control::Skip(position)).await;
    }

    /// Stops the runner at its last committed checkpoint and returns the projection (`None` if
    /// the runner had died of a panic).
    pub async fn stop(mut self) -> Option<P> {
        let _ = self.control.send(Control::Stop).await;
        match self.task.take() {
            Some(task) => task.await.ok().flatten(),
            None => None,
        }
    }

    /// Aborts the runner task immediately (as a crash would); the checkpoint stays where the last
    /// committed batch left it.
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl<P> Drop for ProjectionHandle<P> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Waits until the checkpoint `name` reaches `position`, reading it from `checkpoints` (works across
/// processes: the runner may live elsewhere). Polls with a short, growing interval.
pub async fn wait_for(
    checkpoints: &dyn crate::checkpoint::CheckpointStore,
    name: &str,
    position: Position,
    timeout: Duration,
) -> Result<(), WaitError> {
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(2);
    loop {
        let reached = checkpoints.load_checkpoint(name).await?;
        if reached.is_some_and(|c| c >= position) {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(WaitError::Timeout {
                name: name.to_owned(),
                target: position,
                reached,
                timeout,
            });
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
        interval = (interval * 2).min(Duration::from_millis(50));
    }
}

/// An event a projection skipped on a user's request ([`ProjectionHandle::skip`]).
#[derive(Debug, Clone, PartialEq)]
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

/// Runs projections whose read model lives in this process's memory (`Context = ()`), over any
/// event store. Checkpoints live here too, beside the read model they describe: both are gone when
/// the process ends, so a restarted process rebuilds its in-memory read models from the log instead
/// of trusting a durable checkpoint that no longer matches them.
///
/// Handlers apply one event at a time; after a failure the checkpoint is moved to the last applied
/// event, so the read model and its checkpoint never disagree. One lease per projection name: share
/// one `InProcess` (in an `Arc`, see [`ProjectionRunner::with_backend`]) between runners that must
/// exclude each other.
pub struct InProcess<S> {
    store: S,
    checkpoints: crate::memory::InMemoryStore,
    leases: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    skipped: Arc<std::sync::Mutex<Vec<SkippedEvent>>>,
}

impl<S: EventStore> InProcess<S> {
    /// Projections over `store`, with fresh checkpoints.
    pub fn new(store: S) -> Self {
        Self {
            store,
            checkpoints: crate::memory::InMemoryStore::new(),
            leases: Arc::default(),
            skipped: Arc::default(),
        }
    }

    /// Every event skipped on request, oldest first.
    pub fn skipped_events(&self) -> Vec<SkippedEvent> {
        lock(&self.skipped).clone()
    }

    /// The checkpoints of the projections run here (e.g. for [`wait_for`]).
    pub fn checkpoints(&self) -> &dyn crate::checkpoint::CheckpointStore {
        &self.checkpoints
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<S: EventStore, P: Projection<Context = ()>> ProjectionBackend<P> for InProcess<S> {
    fn events(&self) -> &dyn EventStore {
        &self.store
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        use crate::checkpoint::CheckpointStore;
        self.checkpoints.load_checkpoint(name).await
    }

    async fn commit_batch(
        &self,
        projection: &mut P,
        name: &str,
        expected: Option<Position>,
        events: &[RecordedEvent],
        to: Position,
    ) -> Result<(), BatchError> {
        use crate::checkpoint::CheckpointStore;
        let actual = self.checkpoints.load_checkpoint(name).await?;
        if actual != expected {
            return Err(StoreError::CheckpointConflict {
                name: name.to_owned(),
                expected,
                actual,
            }
            .into());
        }
        for (index, event) in events.iter().enumerate() {
            if let Err(error) = handle_event(projection, event, &mut ()).await {
                // The events before it are applied (in memory, nothing to roll back): flush
                // them and move the checkpoint to the last one.
                let flushed = flush_batch(projection, &mut ()).await;
                if flushed.is_err() {
                    projection.discard();
                }
                let done = index.checked_sub(1).map(|i| events[i].position);
                if let (Some(done), Ok(())) = (done, flushed) {
                    self.checkpoints
                        .save_checkpoint(name, expected, done)
                        .await?;
                    return Err(BatchError::Projection {
                        index,
                        committed: index,
                        error,
                    });
                }
                return Err(BatchError::Projection {
                    index,
                    committed: 0,
                    error,
                });
            }
        }
        if let Err(error) = flush_batch(projection, &mut ()).await {
            projection.discard();
            return Err(BatchError::Projection {
                index: events.len().saturating_sub(1),
                committed: 0,
                error,
            });
        }
        self.checkpoints.save_checkpoint(name, expected, to).await?;
        Ok(())
    }

    async fn reset_checkpoint(&self, name: &str) -> Result<(), StoreError> {
        use crate::checkpoint::CheckpointStore;
        self.checkpoints.delete_checkpoint(name).await
    }

    async fn record_skip(
        &self,
        name: &str,
        expected: Option<Position>,
        event: &SkipTarget,
        reason: &str,
    ) -> Result<(), StoreError> {
        use crate::checkpoint::CheckpointStore;
        self.checkpoints
            .save_checkpoint(name, expected, event.position)
            .await?;
        lock(&self.skipped).push(SkippedEvent {
            projection: name.to_owned(),
            position: event.position,
            event_type: event.event_type.clone(),
            reason: reason.to_owned(),
        });
        Ok(())
    }

    async fn acquire_lease(&self, name: &str) -> Result<Option<Box<dyn Lease>>, StoreError> {
        if !lock(&self.leases).insert(name.to_owned()) {
            return Ok(None);
        }
        Ok(Some(Box::new(LocalLease {
            leases: Arc::clone(&self.leases),
            name: name.to_owned(),
        })))
    }

    async fn wait_for_append(&self, after: Position, timeout: Duration) {
        self.store.wait_for_append(after, timeout).await;
    }
}

struct LocalLease {
    leases: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    name: String,
}

#[async_trait::async_trait]
impl Lease for LocalLease {
    async fn is_held(&mut self) -> bool {
        true
    }
}

impl Drop for LocalLease {
    fn drop(&mut self) {
        lock(&self.leases).remove(&self.name);
    }
}
