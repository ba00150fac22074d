//! Subscriptions: run a [`Projection`] over the global log, from its checkpoint, forever.
//!
//! A [`ProjectionRunner`] catches up in batches over the gap-free [`EventStore::read_all`], reading only
//! the event types the projection handles, then follows live appends (woken by the backend, with a
//! polling fallback so a lost wake-up only delays). Each batch and the checkpoint advance commit
//! atomically through the [`ProjectionBackend`], whose checkpoint compare-and-set means two runners
//! can never both apply a batch; a lease keeps one active runner per projection.
//!
//! Failure policy: a handler error or undecodable event stops the projection at the last good
//! checkpoint, is logged with `tracing`, shown in [`ProjectionStatus`], and retried with exponential
//! backoff. [`ProjectionHandle::skip`] skips a poison event explicitly; the skip is recorded by the
//! backend. Nothing is swallowed silently.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::event::RecordedEvent;
use crate::projection::{Projection, ProjectionError};
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

    /// Records that `event` was skipped on a user's request, and moves the checkpoint past it.
    fn record_skip(
        &self,
        name: &str,
        expected: Option<Position>,
        event: &RecordedEvent,
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
    /// Stopped on request.
    Stopped,
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
    /// The last error (cleared by the next successful batch), with the failing position if known.
    pub last_error: Option<(Option<Position>, String)>,
}

/// Tuning for a [`ProjectionRunner`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunnerConfig {
    /// Events per batch (and per transaction).
    pub batch_size: usize,
    /// Longest wait for a wake-up before polling anyway.
    pub poll_interval: Duration,
    /// First retry delay after a failure; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
    /// How often a standby runner tries to take the lease.
    pub standby_interval: Duration,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            batch_size: 500,
            poll_interval: Duration::from_secs(1),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            standby_interval: Duration::from_secs(1),
        }
    }
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

/// The head, then the batch after a cursor: what one step of a runner reads.
type BatchRead = Result<(Option<Position>, Vec<RecordedEvent>), StoreError>;

async fn read_batch(
    store: &dyn EventStore,
    after: Position,
    types: EventTypes<'_>,
    limit: usize,
) -> BatchRead {
    let head = store.head().await?;
    let events = store.read_all(after, types, limit).await?;
    Ok((head, events))
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

    /// Processes every event up to the head as it is now, reporting progress after each batch, and
    /// returns the projection. Ignores the lease: use it for rebuilds and one-off catch-ups.
    pub async fn catch_up(
        mut self,
        mut progress: impl FnMut(Progress) + Send,
    ) -> Result<P, BatchError> {
        let types = EventTypes::Only(P::EVENT_TYPES);
        let store = self.backend.events();
        let mut checkpoint = self.backend.load_checkpoint(&self.name).await?;
        let Some(head) = store.head().await? else {
            return Ok(self.projection);
        };
        // Up to `head` only: writers may append while this runs.
        let total = store
            .count_between(checkpoint.unwrap_or(Position::START), head, types)
            .await?;
        let started = Instant::now();
        let mut done = 0u64;
        let limit = self.config.batch_size;
        let mut reader = LogReader::new(P::EVENT_TYPES);
        let mut next = match checkpoint {
            Some(c) if c >= head => None,
            _ => Some(
                store
                    .read_all(checkpoint.unwrap_or(Position::START), reader.types(), limit)
                    .await?,
            ),
        };
        while let Some(mut events) = next.take() {
            events.retain(|e| e.position <= head);
            let to = match events.last() {
                Some(last) if events.len() == limit => last.position,
                _ => head,
            };
            reader.keep_handled(&mut events);
            let commit = self.backend.commit_batch(
                &mut self.projection,
                &self.name,
                checkpoint,
                &events,
                to,
            );
            if to < head {
                // Read the next batch while this one commits: the read depends only on `to`, and
                // is dropped unused if the commit fails.
                let read = store.read_all(to, reader.types(), limit);
                let (committed, read) = futures_util::future::join(commit, read).await;
                committed?;
                next = Some(read?);
            } else {
                commit.await?;
            }
            checkpoint = Some(to);
            done += events.len() as u64;
            progress(Progress {
                done,
                total,
                rate: done as f64 / started.elapsed().as_secs_f64().max(1e-9),
            });
        }
        Ok(self.projection)
    }

    /// Resets the checkpoint and replays everything into `fresh` (an empty read model), reporting
    /// progress. `reset` clears the old read model first (e.g. truncates its tables); it runs before
    /// the checkpoint is deleted so a crash in between only causes a second, clean rebuild.
    pub async fn rebuild<F, Fut>(
        mut self,
        fresh: P,
        reset: F,
        progress: impl FnMut(Progress) + Send,
    ) -> Result<P, BatchError>
    where
        F: FnOnce() -> Fut + Send,
        Fut: Future<Output = Result<(), StoreError>> + Send,
    {
        self.projection = fresh;
        reset().await?;
        self.backend.reset_checkpoint(&self.name).await?;
        self.catch_up(progress).await
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
        let task = tokio::spawn(self.run(status_tx, control_rx).instrument(span));
        ProjectionHandle {
            status: status_rx,
            control: control_tx,
            task: Some(task),
        }
    }

    async fn run(
        mut self,
        status: watch::Sender<ProjectionStatus>,
        mut control: mpsc::Receiver<Control>,
    ) -> P {
        let mut reader = LogReader::new(P::EVENT_TYPES);
        let limit = self.config.batch_size;
        // The next batch, read while the previous one committed: (its cursor, what was read).
        let mut ahead: Option<(Position, BatchRead)> = None;
        let mut lease: Option<Box<dyn Lease>> = None;
        let mut checkpoint: Option<Position> = None;
        let mut backoff = self.config.initial_backoff;
        let mut failed_at: Option<RecordedEvent> = None;
        loop {
            while let Ok(message) = control.try_recv() {
                match message {
                    Control::Stop => return self.stopped(&status),
                    Control::Skip(position) => self.pending_skip = Some(position),
                }
            }
            if let Some(position) = self.pending_skip.take() {
                if let Some(event) = failed_at.take_if(|e| e.position == position) {
                    let reason = status
                        .borrow()
                        .last_error
                        .as_ref()
                        .map_or_else(String::new, |e| e.1.clone());
                    match self
                        .backend
                        .record_skip(&self.name, checkpoint, &event, &reason)
                        .await
                    {
                        Ok(()) => {
                            tracing::warn!(%position, event_type = %event.event_type, %reason,
                                "event skipped on request");
                            checkpoint = Some(position);
                            backoff = self.config.initial_backoff;
                            status.send_modify(|s| {
                                s.checkpoint = checkpoint;
                                s.state = ProjectionState::Running;
                                s.last_error = None;
                            });
                        }
                        Err(error) => {
                            failed_at = Some(event);
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
                                self.failed(&status, None, &error.to_string());
                                if self.pause(&mut control, &mut backoff).await {
                                    return self.stopped(&status);
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
                            .sleep_or_stop(&mut control, self.config.standby_interval)
                            .await
                        {
                            return self.stopped(&status);
                        }
                        continue;
                    }
                    Err(error) => {
                        self.failed(&status, None, &error.to_string());
                        if self.pause(&mut control, &mut backoff).await {
                            return self.stopped(&status);
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
                    self.failed(&status, None, &error.to_string());
                    if self.pause(&mut control, &mut backoff).await {
                        return self.stopped(&status);
                    }
                    continue;
                }
            };
            let (head, mut events) = batch;
            // A short batch read after `head` was taken means every event up to `head` has been seen.
            let caught_up = events.len() < limit;
            let last = events.last().map(|e| e.position);
            let to = if caught_up { last.max(head) } else { last }.unwrap_or(after);
            reader.keep_handled(&mut events);
            if events.is_empty() && to <= after {
                if self.wait_or_stop(&mut control, after).await {
                    return self.stopped(&status);
                }
                continue;
            }
            let commit = self.backend.commit_batch(
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
                if outcome.is_ok() {
                    ahead = Some((to, read));
                }
                outcome
            };
            match outcome {
                Ok(()) => {
                    checkpoint = Some(to);
                    backoff = self.config.initial_backoff;
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
                        if self
                            .backend
                            .commit_batch(&mut self.projection, &self.name, checkpoint, prefix, to)
                            .await
                            .is_ok()
                        {
                            checkpoint = Some(to);
                            good = index;
                        }
                    }
                    let position = events[index].position;
                    status.send_modify(|s| {
                        s.checkpoint = checkpoint;
                        s.processed += good as u64;
                        s.lag = s.lag.map(|lag| lag.saturating_sub(good as u64));
                    });
                    failed_at = Some(events[index].clone());
                    self.failed(&status, Some(position), &error.to_string());
                    if self.pause(&mut control, &mut backoff).await {
                        return self.stopped(&status);
                    }
                }
                Err(BatchError::Store(StoreError::CheckpointConflict { actual, .. })) => {
                    tracing::warn!(?actual, "checkpoint moved by another runner; re-reading");
                    checkpoint = actual;
                    lease = None;
                }
                Err(BatchError::Store(error)) => {
                    self.failed(&status, None, &error.to_string());
                    if self.pause(&mut control, &mut backoff).await {
                        return self.stopped(&status);
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

    fn failed(
        &self,
        status: &watch::Sender<ProjectionStatus>,
        position: Option<Position>,
        error: &str,
    ) {
        tracing::error!(position = ?position, %error, "projection failed; retrying with backoff");
        status.send_modify(|s| {
            s.state = ProjectionState::Failed;
            s.last_error = Some((position, error.to_owned()));
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
        *backoff = (*backoff * 2).min(self.config.max_backoff);
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
        let wake = backend.wait_for_append(after, self.config.poll_interval);
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

/// Controls a spawned [`ProjectionRunner`] and observes its status.
pub struct ProjectionHandle<P> {
    status: watch::Receiver<ProjectionStatus>,
    control: mpsc::Sender<Control>,
    task: Option<JoinHandle<P>>,
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

    /// Waits until this runner has committed `position` (or anything after it). Times out cleanly,
    /// also when the runner is stopped or failing.
    pub async fn wait_for(&self, position: Position, timeout: Duration) -> Result<(), WaitError> {
        let reached = |s: &ProjectionStatus| s.checkpoint.is_some_and(|c| c >= position);
        let mut status = self.status.clone();
        let outcome = tokio::time::timeout(timeout, status.wait_for(reached))
            .await
            .map(|r| r.is_ok());
        match outcome {
            Ok(true) => Ok(()),
            // Ok(false): the runner ended; answer from its last status.
            _ => {
                let last = self.status.borrow().clone();
                if reached(&last) {
                    return Ok(());
                }
                Err(WaitError::Timeout {
                    name: last.name,
                    target: position,
                    reached: last.checkpoint,
                    timeout,
                })
            }
        }
    }

    /// Skips the event at `position`, which must be the event the projection is failing on. The
    /// backend records the skip.
    pub async fn skip(&self, position: Position) {
        // A closed channel means the runner ended; nothing left to skip.
        let _ = self.control.send(Control::Skip(position)).await;
    }

    /// Stops the runner at its last committed checkpoint and returns the projection.
    pub async fn stop(mut self) -> Option<P> {
        let _ = self.control.send(Control::Stop).await;
        match self.task.take() {
            Some(task) => task.await.ok(),
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
    /// Its type.
    pub event_type: String,
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
            if let Err(error) = projection.handle(event, &mut ()).await {
                // The events before it are applied (in memory, nothing to roll back): flush
                // them and move the checkpoint to the last one.
                let flushed = projection.flush(&mut ()).await;
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
        if let Err(error) = projection.flush(&mut ()).await {
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
        event: &RecordedEvent,
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
