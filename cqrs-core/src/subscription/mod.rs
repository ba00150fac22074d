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
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tracing::Instrument;

use crate::backend::{BatchError, Lease, ProjectionBackend, SkipTarget};
use crate::event::RecordedEvent;
use crate::projection::{Projection, ProjectionError, Subscription};
use crate::store::{EventStore, EventTypes, StoreError};
use crate::stream::Position;

mod config;
mod delivering;
mod handle;
mod in_process;
mod status;

pub use config::{InvalidConfig, RunnerConfig, RunnerConfigBuilder};
pub use handle::{wait_for, ProjectionHandle};
pub use in_process::InProcess;
pub use status::{
    FailureCause, Progress, ProjectionFailure, ProjectionState, ProjectionStatus, RecordedFailure,
    RunError, SkippedEvent, WaitError,
};

pub(crate) enum Control {
    Stop,
    Skip(Position),
}

/// How a runner reads the log. While most events are of types the projection handles, reading
/// the whole log and dropping the rest here is cheaper than the store's type-filtered read (one
/// index range per type, merged); once a batch shows that fewer than half are handled, the runner
/// switches to the filtered read for good. Both reads return the same handled events in the same
/// order, so the choice only changes speed. The stream-type filter of a [`Subscription`] is
/// always applied here: the store filters by event type only.
#[derive(Debug, Clone, Copy)]
struct LogReader {
    subscription: Subscription,
    whole_log: bool,
}

impl LogReader {
    fn new(subscription: Subscription) -> Self {
        Self {
            subscription,
            whole_log: true,
        }
    }

    /// What to ask the store for.
    fn types(self) -> EventTypes<'static> {
        if self.whole_log {
            EventTypes::All
        } else {
            self.subscription.event_types
        }
    }

    /// Keeps the handled events of a batch read with [`LogReader::types`], and picks the read for
    /// the next batches.
    fn keep_handled(&mut self, events: &mut Vec<RecordedEvent>) {
        let read = events.len();
        events.retain(|e| self.subscription.matches(e));
        // Only a filter by event type can be pushed down to the store.
        let narrower = matches!(self.subscription.event_types, EventTypes::Only(_));
        if self.whole_log && narrower && events.len() * 2 < read {
            self.whole_log = false;
        }
    }
}

/// A catch-up's bounds: every event committed before it started, up to `target`, is applied
/// after `checkpoint` (`after` when there is none); `total` of them, for progress (counted only
/// when someone watches the progress, 0 otherwise).
struct CatchUpStart {
    target: Position,
    checkpoint: Option<Position>,
    after: Position,
    total: u64,
}

/// Where a catch-up of `name` starts and ends: `None` if there is nothing to do. A free function
/// of the backend, like [`take_lease`], so its future is `Send` for projections that are not `Sync`.
///
/// `count`: whether to count the events to handle, for a progress report's total. The count is
/// a scan of the whole range, as long as a good part of reading it: only a caller who reports
/// progress pays for it.
async fn catch_up_start<P: Projection, B: ProjectionBackend<P>>(
    backend: &B,
    name: &str,
    count: bool,
) -> Result<Option<CatchUpStart>, RunError> {
    let store = backend.events();
    let Some(target) = store.committed_head().await? else {
        return Ok(None);
    };
    store.wait_until_readable(target).await?;
    let checkpoint = backend.load_checkpoint(name).await?;
    let after = checkpoint.unwrap_or(Position::START);
    if after >= target {
        return Ok(None);
    }
    // Up to `target` only: writers may append while this runs.
    let total = if count {
        store
            .count_between(after, target, P::SUBSCRIPTION.event_types)
            .await?
    } else {
        0
    };
    Ok(Some(CatchUpStart {
        target,
        checkpoint,
        after,
        total,
    }))
}

/// Where a live page takes the checkpoint, and whether it caught up: a short, complete page read
/// after `head` was taken means every event up to `head` has been seen (it ends at `head` if that
/// is further); a page cut short before an unreadable row has not (it ends at its last event).
/// `after` if it holds nothing.
fn live_page_end(
    events: &[RecordedEvent],
    complete: bool,
    limit: usize,
    head: Option<Position>,
    after: Position,
) -> (Position, bool) {
    let caught_up = complete && events.len() < limit;
    let last = events.last().map(|e| e.position);
    let to = if caught_up { last.max(head) } else { last }.unwrap_or(after);
    (to, caught_up)
}

/// Drops the events of a catch-up page past `target` and returns the position the page's batch
/// takes the checkpoint to. Everything up to `target` is readable, so a page cut at `target`, or
/// a short complete one, ends at `target`.
fn trim_to_target(
    events: &mut Vec<RecordedEvent>,
    complete: bool,
    limit: usize,
    target: Position,
) -> Position {
    let read = events.len();
    events.retain(|e| e.position <= target);
    let at_target = events.len() < read || (complete && read < limit);
    match events.last() {
        Some(last) if !at_target => last.position,
        _ => target,
    }
}

/// Takes the lease of `name`, or fails with [`RunError::LeaseHeld`]. A free function of the backend
/// and the name, not a method: a future borrowing the runner would be `Send` only for `Sync`
/// projections.
async fn take_lease<P: Projection, B: ProjectionBackend<P>>(
    backend: &B,
    name: &str,
) -> Result<Box<dyn Lease>, RunError> {
    backend
        .acquire_lease(name)
        .await?
        .ok_or_else(|| RunError::LeaseHeld {
            name: name.to_owned(),
        })
}

/// Records how a catch-up or rebuild ended as the projection's last failure (cleared when it
/// completed), for operators' tools in other processes. Best effort, with the lease held: the
/// outcome itself is what the caller gets.
async fn record_outcome<P: Projection, B: ProjectionBackend<P>>(
    backend: &B,
    name: &str,
    outcome: &Result<(), RunError>,
) {
    let failure = match outcome {
        Ok(()) => None,
        Err(RunError::Projection(error)) => Some(ProjectionFailure::of_projection(error)),
        Err(RunError::Store(error)) => Some(ProjectionFailure::of_store(error)),
        Err(RunError::Panicked { message, .. }) => Some(ProjectionFailure::panic(message)),
        Err(RunError::LeaseHeld { .. }) => return,
    };
    if let Err(error) = backend.record_failure(name, failure.as_ref()).await {
        tracing::warn!(%error, "recording the projection's last failure failed");
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
        crate::backend::panic_message(panic.as_ref())
    })
}

/// A committed batch, or the message of a panic that escaped the backend.
type Committed = Result<Result<(), BatchError>, String>;

/// What the live loop does after a step.
enum Next {
    /// Step again at once.
    Go,
    /// Caught up at this position: wait for an append (or the polling interval).
    Wait(Position),
    /// Another runner holds the lease: try again after the standby interval.
    Standby,
    /// A failure: wait for the current backoff, which then doubles.
    Backoff,
}

/// A live runner's state between steps.
struct Live {
    /// Whole-log or filtered reads (see [`LogReader`]).
    reader: LogReader,
    /// The next batch, read while the previous one committed: its cursor, and what was read.
    ahead: Option<(Position, BatchRead)>,
    /// Held while this runner is the active one.
    lease: Option<Box<dyn Lease>>,
    /// The last committed position.
    checkpoint: Option<Position>,
    /// The next backoff.
    backoff: Duration,
    /// The event the runner is failing on, while the failure is skippable.
    failed_at: Option<SkipTarget>,
    /// The failure the backend keeps for this projection ([`ProjectionBackend::record_failure`]),
    /// as far as this runner knows; `None` while unknown (not holding the lease, or reading it
    /// failed), so that the next check writes it.
    recorded: Option<Option<ProjectionFailure>>,
    /// Batches handed over and not yet checkpointed (a [`ProjectionRunner::delivering`]
    /// runner's), in order.
    handed: std::collections::VecDeque<delivering::Handed>,
}

/// Runs one projection over the global log: catches up from its checkpoint, then follows new
/// appends. See the [module documentation](self) for the failure policy.
///
/// A runner needs a projection (usually a `#[projection]` impl) and a
/// [`ProjectionBackend`] for where its read model lives: [`InProcess`] for a read model in this
/// process's memory, `cqrs_postgres::PostgresProjections` or `cqrs_sqlite::SqliteProjections` for
/// one in the database. Then either:
///
/// - [`ProjectionRunner::spawn`] it: it runs until stopped and a [`ProjectionHandle`] reports its
///   status, waits for positions ([`ProjectionHandle::wait_for`]) and skips poison events; or
/// - run it once: [`ProjectionRunner::catch_up`] applies everything committed before the call
///   and returns the projection; [`ProjectionRunner::rebuild`] does the same from scratch.
///
/// One runner per projection name holds the lease at a time; others wait as standbys (spawned)
/// or fail with [`RunError::LeaseHeld`] (`catch_up`, `rebuild`).
///
/// ```
/// use std::time::Duration;
/// use cqrs_core::prelude::*;
/// use cqrs_core::subscription::InProcess;
/// use serde::{Deserialize, Serialize};
///
/// #[event(name = "Registered")]
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// pub struct Registered { pub email: String }
///
/// /// How many users registered.
/// #[derive(Debug, Default)]
/// pub struct Registrations { count: u64 }
///
/// #[projection(name = "registrations")]
/// impl Registrations {
///     fn registered(&mut self, _: &Registered) {
///         self.count += 1;
///     }
/// }
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = InMemoryStore::new();
/// # use cqrs_core::{NewEvent, StreamId};
/// # let event = NewEvent::from_event(&Registered { email: "ada@example.com".into() })?;
/// # store.append(&StreamId::new("user", "ada"), ExpectedVersion::NoStream, vec![event]).await?;
/// let config = RunnerConfig::builder().batch_size(100).build()?;
///
/// // Once: everything committed so far, then the projection back.
/// let runner = ProjectionRunner::new(Registrations::default(), InProcess::new(store.clone()))
///     .with_config(config);
/// let caught_up = runner.catch_up().await?;
/// assert_eq!(caught_up.count, 1);
///
/// // Or for as long as the application runs.
/// let handle = ProjectionRunner::new(Registrations::default(), InProcess::new(store.clone()))
///     .with_config(config)
///     .spawn();
/// let head = store.head().await?.expect("one event");
/// handle.wait_for(head, Duration::from_secs(5)).await?;
/// println!("{:?}", handle.status());
/// let registrations = handle.stop().await.expect("the runner did not panic");
/// assert_eq!(registrations.count, 1);
/// # Ok(()) }
/// ```
pub struct ProjectionRunner<P: Projection, B> {
    projection: P,
    backend: Arc<B>,
    name: String,
    config: RunnerConfig,
    /// A skip requested while the runner was waiting; handled at the top of the loop.
    pending_skip: Option<Position>,
    /// Registered when the runner starts (its name is final then).
    metrics: Option<crate::metrics::ProjectionMetrics>,
    /// Set by [`ProjectionRunner::delivering`]: batches go through [`crate::Deliver`].
    deliver: Option<delivering::DeliverFn<P>>,
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
        Self::shared(projection, Arc::new(backend))
    }

    /// A runner on a backend shared with other runners (whose leases then exclude each other in
    /// this process too, for backends that keep leases in memory).
    pub fn shared(projection: P, backend: Arc<B>) -> Self {
        Self {
            projection,
            backend,
            name: P::NAME.to_owned(),
            config: RunnerConfig::default(),
            pending_skip: None,
            metrics: None,
            deliver: None,
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

    /// Processes every event committed before the call and returns the projection.
    ///
    /// It takes the projection's lease for its duration and fails with [`RunError::LeaseHeld`]
    /// if another runner holds it. It returns `Ok` only once every event committed before the
    /// call is applied: on PostgreSQL, events held back by an older running transaction are
    /// waited for (boundedly), then it fails with [`StoreError::NotYetReadable`] naming the
    /// holder rather than return a read model with events missing.
    pub async fn catch_up(self) -> Result<P, RunError> {
        self.catch_up_reporting(|_| {}, false).await
    }

    /// [`ProjectionRunner::catch_up`], reporting progress after each batch: how many events are
    /// done, of how many, and how fast. The total is counted before the first batch is read,
    /// which costs a scan of the range to catch up on.
    pub async fn catch_up_with_progress(
        self,
        progress: impl FnMut(Progress) + Send,
    ) -> Result<P, RunError> {
        self.catch_up_reporting(progress, true).await
    }

    async fn catch_up_reporting(
        mut self,
        progress: impl FnMut(Progress) + Send,
        count: bool,
    ) -> Result<P, RunError> {
        let lease = take_lease(&*self.backend, &self.name).await?;
        let outcome = self.catch_up_leased(progress, count).await;
        record_outcome(&*self.backend, &self.name, &outcome).await;
        outcome?;
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
        self,
        fresh: P,
        reset: F,
        progress: impl FnMut(Progress) + Send,
    ) -> Result<P, RunError>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<(), StoreError>> + Send,
    {
        self.rebuild_then(fresh, reset, progress, |_| async { Ok(()) })
            .await
            .map(|(projection, ())| projection)
    }

    /// [`ProjectionRunner::rebuild`], then `finish` with the position the rebuild reached (`None`
    /// for an empty log) before the lease is released: the switch of a blue/green rebuild, which
    /// must not race another rebuild of the same name resetting what was just built. A `finish`
    /// failing with [`StoreError::CheckpointConflict`] (the live version it switches from moved
    /// past what was built) is called again after another catch-up, up to 10 times in all; any
    /// other error of `finish` is the rebuild's.
    pub async fn rebuild_then<F, Fut, G, GFut, T>(
        mut self,
        fresh: P,
        reset: F,
        progress: impl FnMut(Progress) + Send,
        finish: G,
    ) -> Result<(P, T), RunError>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<(), StoreError>> + Send,
        G: FnMut(Option<Position>) -> GFut + Send,
        GFut: Future<Output = Result<T, StoreError>> + Send,
    {
        let lease = take_lease(&*self.backend, &self.name).await?;
        self.projection = fresh;
        reset().await?;
        self.backend.reset_checkpoint(&self.name).await?;
        let finished = self.finish_leased(progress, finish).await?;
        drop(lease);
        Ok((self.projection, finished))
    }

    /// [`ProjectionRunner::catch_up`], then `finish` with the position reached before the lease
    /// is released (see [`ProjectionRunner::rebuild_then`]): resuming an interrupted blue/green
    /// build.
    pub async fn catch_up_then<G, GFut, T>(
        mut self,
        progress: impl FnMut(Progress) + Send,
        finish: G,
    ) -> Result<(P, T), RunError>
    where
        G: FnMut(Option<Position>) -> GFut + Send,
        GFut: Future<Output = Result<T, StoreError>> + Send,
    {
        let lease = take_lease(&*self.backend, &self.name).await?;
        let finished = self.finish_leased(progress, finish).await?;
        drop(lease);
        Ok((self.projection, finished))
    }

    /// The catch-up, its outcome recorded, then `finish`; the lease held by the caller. A
    /// `finish` failing with [`StoreError::CheckpointConflict`] (what it switches to moved past
    /// what was built) is tried again after another catch-up, a bounded number of times.
    async fn finish_leased<G, GFut, T>(
        &mut self,
        mut progress: impl FnMut(Progress) + Send,
        mut finish: G,
    ) -> Result<T, RunError>
    where
        G: FnMut(Option<Position>) -> GFut + Send,
        GFut: Future<Output = Result<T, StoreError>> + Send,
    {
        const FINISH_ATTEMPTS: usize = 10;
        let mut attempt = 1;
        loop {
            let outcome = self.catch_up_leased(&mut progress, true).await;
            record_outcome(&*self.backend, &self.name, &outcome).await;
            outcome?;
            let reached = self.backend.load_checkpoint(&self.name).await?;
            match finish(reached).await {
                Err(StoreError::CheckpointConflict { .. }) if attempt < FINISH_ATTEMPTS => {
                    attempt += 1;
                }
                finished => return Ok(finished?),
            }
        }
    }

    /// The catch-up itself, with the lease held by the caller.
    /// `count`: whether progress reports carry a total (see [`catch_up_start`]).
    async fn catch_up_leased(
        &mut self,
        mut progress: impl FnMut(Progress) + Send,
        count: bool,
    ) -> Result<(), RunError> {
        if let Some(deliver) = self.deliver {
            return self.catch_up_delivering(deliver, progress, count).await;
        }
        // Reads (ahead of commits) go through their own handle on the backend.
        let backend = Arc::clone(&self.backend);
        let store = backend.events();
        let Some(CatchUpStart {
            target,
            mut checkpoint,
            after,
            total,
        }) = catch_up_start(&*self.backend, &self.name, count).await?
        else {
            return Ok(());
        };
        let started = Instant::now();
        let mut done = 0u64;
        let limit = self.config.batch_size();
        let mut reader = LogReader::new(P::SUBSCRIPTION);
        let mut next = Some(read_page(store, after, reader.types(), limit).await?);
        while let Some(Page {
            mut events,
            complete,
        }) = next.take()
        {
            let to = trim_to_target(&mut events, complete, limit, target);
            reader.keep_handled(&mut events);
            // Read the next batch while this one commits: the read depends only on `to`.
            let read_next = (to < target).then(|| read_page(store, to, reader.types(), limit));
            let (committed, read) = self
                .commit_reading_ahead(checkpoint, &events, to, read_next)
                .await;
            let committed = committed.map_err(|message| RunError::Panicked {
                name: self.name.clone(),
                message,
            })?;
            if let Err(BatchError::Projection {
                index,
                committed: kept,
                ..
            }) = &committed
            {
                // Commit the good prefix, as the live loop does, so the projection stops right
                // before the bad event, where it can be skipped.
                let (index, kept) = (*index, *kept);
                if index > kept {
                    let prefix = &events[kept..index];
                    let from = match kept {
                        0 => checkpoint,
                        _ => Some(events[kept - 1].position),
                    };
                    let to = prefix[prefix.len() - 1].position;
                    let (prefix_committed, _) = self
                        .commit_reading_ahead(from, prefix, to, None::<std::future::Ready<()>>)
                        .await;
                    if matches!(prefix_committed, Ok(Ok(()))) {
                        let done = done + index as u64;
                        progress(Progress {
                            done,
                            total,
                            rate: done as f64 / started.elapsed().as_secs_f64().max(1e-9),
                        });
                    }
                }
            }
            committed.map_err(RunError::from)?;
            next = read.transpose()?;
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
                        let message = crate::backend::panic_message(panic.as_ref());
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
        let mut live = Live {
            reader: LogReader::new(P::SUBSCRIPTION),
            ahead: None,
            lease: None,
            checkpoint: None,
            backoff: self.config.initial_backoff(),
            failed_at: None,
            recorded: None,
            handed: std::collections::VecDeque::new(),
        };
        loop {
            while let Ok(message) = control.try_recv() {
                match message {
                    Control::Stop => {
                        self.abandon_handed(&mut live);
                        return self.stopped(status);
                    }
                    Control::Skip(position) => self.pending_skip = Some(position),
                }
            }
            if let Some(position) = self.pending_skip.take() {
                self.skip(&mut live, status, position).await;
            }
            let next = match self.deliver {
                Some(deliver) => self.step_delivering(&mut live, status, deliver).await,
                None => self.step(&mut live, status).await,
            };
            Self::keep_failure_recorded(&*self.backend, &self.name, &mut live, status).await;
            self.observe(status);
            let stop = match next {
                Next::Go => false,
                Next::Wait(after) => self.wait_or_stop(&mut control, after).await,
                Next::Standby => {
                    let interval = self.config.standby_interval();
                    self.sleep_or_stop(&mut control, interval).await
                }
                Next::Backoff => {
                    let delay = live.backoff;
                    live.backoff = (delay * 2).min(self.config.max_backoff());
                    self.sleep_or_stop(&mut control, delay).await
                }
            };
            if stop {
                self.abandon_handed(&mut live);
                return self.stopped(status);
            }
        }
    }

    /// Records the status's lag and state changes.
    fn observe(&mut self, status: &watch::Sender<ProjectionStatus>) {
        let name = &self.name;
        let metrics = self
            .metrics
            .get_or_insert_with(|| crate::metrics::ProjectionMetrics::new(name));
        metrics.observe(&status.borrow());
    }

    /// One step of the live runner: make sure it holds the lease, read the next batch (or take
    /// the one read ahead), commit it, and say what to do next.
    async fn step(&mut self, live: &mut Live, status: &watch::Sender<ProjectionStatus>) -> Next {
        if let Some(next) = self.hold_lease(live, status).await {
            return next;
        }
        let limit = self.config.batch_size();
        let after = live.checkpoint.unwrap_or(Position::START);
        // The read ahead runs while `self` commits: it reads through its own handle.
        let backend = Arc::clone(&self.backend);
        let store = backend.events();
        let batch = match live.ahead.take().filter(|(cursor, _)| *cursor == after) {
            Some((_, read)) => read,
            None => read_batch(store, after, live.reader.types(), limit).await,
        };
        let (head, page) = match batch {
            Ok(batch) => batch,
            Err(error) => {
                let failure = ProjectionFailure::of_store(&error);
                // An unreadable row right after the checkpoint is this projection's poison
                // event: skippable at its position like a failing handler.
                live.failed_at = failure.position.map(SkipTarget::unreadable);
                self.failed(status, failure);
                return Next::Backoff;
            }
        };
        let Page {
            mut events,
            complete,
        } = page;
        let (to, caught_up) = live_page_end(&events, complete, limit, head, after);
        live.reader.keep_handled(&mut events);
        if events.is_empty() && to <= after {
            return Next::Wait(after);
        }
        // Behind: read the next batch while this one commits.
        let reader = live.reader;
        let read_next = (!caught_up).then(|| read_batch(store, to, reader.types(), limit));
        let (outcome, ahead) = self
            .commit_reading_ahead(live.checkpoint, &events, to, read_next)
            .await;
        live.ahead = ahead.map(|read| (to, read));
        self.settle(live, status, outcome, &events, to, caught_up)
            .await
    }

    /// Takes (or checks) the lease; `None` while this runner holds it, else what to do.
    async fn hold_lease(
        &mut self,
        live: &mut Live,
        status: &watch::Sender<ProjectionStatus>,
    ) -> Option<Next> {
        if let Some(lease) = live.lease.as_mut() {
            if lease.is_held().await {
                return None;
            }
        }
        live.lease = None;
        live.recorded = None;
        match self.backend.acquire_lease(&self.name).await {
            Ok(Some(acquired)) => match self.backend.load_checkpoint(&self.name).await {
                Ok(checkpoint) => {
                    live.lease = Some(acquired);
                    live.recorded = match self.backend.last_failure(&self.name).await {
                        Ok(recorded) => Some(recorded.map(|r| r.failure)),
                        Err(_) => None,
                    };
                    // Whatever was handed over since the old checkpoint starts again from the
                    // new one.
                    self.abandon_handed(live);
                    live.checkpoint = checkpoint;
                    tracing::info!(checkpoint = ?checkpoint, "lease acquired");
                    let lag = Self::count_lag(&self.backend, checkpoint).await;
                    status.send_modify(|s| {
                        s.state = ProjectionState::Running;
                        s.checkpoint = checkpoint;
                        s.lag = lag;
                    });
                    None
                }
                Err(error) => {
                    self.failed(status, ProjectionFailure::of_store(&error));
                    Some(Next::Backoff)
                }
            },
            Ok(None) => {
                status.send_modify(|s| s.state = ProjectionState::Standby);
                Some(Next::Standby)
            }
            Err(error) => {
                self.failed(status, ProjectionFailure::of_store(&error));
                Some(Next::Backoff)
            }
        }
    }

    /// Commits `events` up to `to` from `expected`, and meanwhile runs `read_next` (the read
    /// after `to`), whose result is kept only if the commit succeeded. Shared by the live loop and
    /// `catch_up`: the next read never waits for the commit.
    async fn commit_reading_ahead<R>(
        &mut self,
        expected: Option<Position>,
        events: &[RecordedEvent],
        to: Position,
        read_next: Option<impl Future<Output = R>>,
    ) -> (Committed, Option<R>) {
        let metrics = self
            .metrics
            .get_or_insert_with(|| crate::metrics::ProjectionMetrics::new(&self.name));
        let commit = async {
            let started = Instant::now();
            let committed = commit_guarded(
                &*self.backend,
                &mut self.projection,
                &self.name,
                expected,
                events,
                to,
            )
            .await;
            if matches!(committed, Ok(Ok(()))) {
                metrics.batch_committed(events.len(), started.elapsed());
            }
            committed
        }
        .instrument(tracing::debug_span!(
            "projection_batch",
            projection = %self.name,
            events = events.len(),
            from = ?expected,
            to = %to,
        ));
        match read_next {
            Some(read) => {
                let (committed, read) = futures_util::future::join(commit, read).await;
                let read = matches!(committed, Ok(Ok(()))).then_some(read);
                (committed, read)
            }
            None => (commit.await, None),
        }
    }

    /// Takes in a batch's outcome: moves the checkpoint and the status, or records the failure
    /// (after committing the events before a failing one) and says to back off.
    async fn settle(
        &mut self,
        live: &mut Live,
        status: &watch::Sender<ProjectionStatus>,
        outcome: Committed,
        events: &[RecordedEvent],
        to: Position,
        caught_up: bool,
    ) -> Next {
        let outcome = match outcome {
            Ok(outcome) => outcome,
            Err(message) => {
                // Not attributable to one event: retried with backoff, not skippable.
                live.failed_at = None;
                self.failed(status, ProjectionFailure::panic(&message));
                return Next::Backoff;
            }
        };
        match outcome {
            Ok(()) => {
                live.checkpoint = Some(to);
                live.backoff = self.config.initial_backoff();
                live.failed_at = None;
                let previous = status.borrow().lag;
                let lag = match previous {
                    _ if caught_up => Some(0),
                    // Was caught up, now a full batch: a burst; count how far behind.
                    Some(0) | None => Self::count_lag(&self.backend, live.checkpoint).await,
                    Some(lag) => Some(lag.saturating_sub(events.len() as u64)),
                };
                let checkpoint = live.checkpoint;
                status.send_modify(|s| {
                    s.state = ProjectionState::Running;
                    s.checkpoint = checkpoint;
                    s.processed += events.len() as u64;
                    s.lag = lag;
                    s.last_error = None;
                });
                Next::Go
            }
            Err(BatchError::Projection {
                index,
                committed,
                error,
            }) => {
                // Commit the good prefix, so the projection stops right before the bad event.
                let mut good = committed;
                if committed > 0 {
                    live.checkpoint = Some(events[committed - 1].position);
                }
                // An unavailable system fails the prefix as well: back off instead.
                let retry_prefix = !matches!(error, ProjectionError::Unavailable { .. });
                if index > committed && retry_prefix {
                    let prefix = &events[committed..index];
                    let to = prefix[prefix.len() - 1].position;
                    let (prefix_committed, _) = self
                        .commit_reading_ahead(
                            live.checkpoint,
                            prefix,
                            to,
                            None::<std::future::Ready<()>>,
                        )
                        .await;
                    if matches!(prefix_committed, Ok(Ok(()))) {
                        live.checkpoint = Some(to);
                        good = index;
                    }
                }
                let checkpoint = live.checkpoint;
                status.send_modify(|s| {
                    s.checkpoint = checkpoint;
                    s.processed += good as u64;
                    s.lag = s.lag.map(|lag| lag.saturating_sub(good as u64));
                });
                let failure = ProjectionFailure::of_projection(&error);
                live.failed_at = failure.skippable().then(|| SkipTarget::of(&events[index]));
                self.failed(status, failure);
                Next::Backoff
            }
            Err(BatchError::Store(StoreError::CheckpointConflict { actual, .. })) => {
                tracing::warn!(?actual, "checkpoint moved by another runner; re-reading");
                live.checkpoint = actual;
                live.lease = None;
                Next::Go
            }
            Err(BatchError::Store(error)) => {
                live.failed_at = None;
                self.failed(status, ProjectionFailure::of_store(&error));
                Next::Backoff
            }
        }
    }

    /// A skip requested for `position`: recorded by the backend (moving the checkpoint past it)
    /// when it is the event the runner is failing on with a skippable failure; ignored otherwise.
    async fn skip(
        &mut self,
        live: &mut Live,
        status: &watch::Sender<ProjectionStatus>,
        position: Position,
    ) {
        let Some(target) = live.failed_at.take_if(|t| t.position == position) else {
            tracing::warn!(%position, "skip requested for an event that is not failing; ignored");
            return;
        };
        let reason = status
            .borrow()
            .last_error
            .as_ref()
            .map_or_else(String::new, |e| e.message.clone());
        match self
            .backend
            .record_skip(&self.name, live.checkpoint, &target, &reason)
            .await
        {
            Ok(()) => {
                tracing::warn!(%position, event_type = ?target.event_type, %reason,
                    "event skipped on request");
                live.checkpoint = Some(position);
                live.backoff = self.config.initial_backoff();
                let checkpoint = live.checkpoint;
                status.send_modify(|s| {
                    s.checkpoint = checkpoint;
                    s.state = ProjectionState::Running;
                    s.last_error = None;
                });
            }
            Err(error) => {
                live.failed_at = Some(target);
                tracing::error!(%error, "recording a skip failed");
            }
        }
    }

    /// Makes the backend's recorded failure ([`ProjectionBackend::record_failure`]) what the
    /// status shows, while this runner holds the lease: recorded when the projection fails (once
    /// per distinct failure), cleared once a batch or a skip moves past it. A failed write is
    /// logged and tried again after the next step; it never stops the projection.
    async fn keep_failure_recorded(
        backend: &B,
        name: &str,
        live: &mut Live,
        status: &watch::Sender<ProjectionStatus>,
    ) {
        if live.lease.is_none() {
            return;
        }
        let current = status.borrow().last_error.clone();
        if live.recorded.as_ref() == Some(&current) {
            return;
        }
        match backend.record_failure(name, current.as_ref()).await {
            Ok(()) => live.recorded = Some(current),
            Err(error) => {
                tracing::warn!(%error, "recording the projection's last failure failed");
                live.recorded = None;
            }
        }
    }

    /// Events of this projection's types after `checkpoint`; `None` if counting failed (the
    /// status then shows no lag rather than a wrong one).
    async fn count_lag(backend: &B, checkpoint: Option<Position>) -> Option<u64> {
        let after = checkpoint.unwrap_or(Position::START);
        match backend
            .events()
            .count_after(after, P::SUBSCRIPTION.event_types)
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

    fn stopped(mut self, status: &watch::Sender<ProjectionStatus>) -> P {
        status.send_modify(|s| s.state = ProjectionState::Stopped);
        self.observe(status);
        self.projection
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
pub(crate) type CheckpointProbe = Arc<
    dyn Fn() -> futures_util::future::BoxFuture<'static, Result<Option<Position>, StoreError>>
        + Send
        + Sync,
>;
