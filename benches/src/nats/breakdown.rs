//! Where a delivering relay's time goes: the runner's reads, the hand-overs (mapping events to
//! messages and queueing them), the deliveries (from a hand-over to the batch's last ack) and the
//! checkpoint commits. Wrappers around the store, the backend and the projection take the
//! timestamps; nothing in the libraries is instrumented for it.

use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cqrs_core::backend::{BatchError, Lease, ProjectionBackend, SkipTarget};
use cqrs_core::subscription::{ProjectionFailure, RecordedFailure, SkippedEvent};
use cqrs_core::{
    AppendResult, Deliver, Delivery, EventId, EventStore, EventTypes, ExpectedVersion, NewEvent,
    Position, Projection, ProjectionError, RecordedEvent, StoreError, StreamId, StreamVersion,
    Subscription,
};

/// Summed durations over a run of a delivering relay.
#[derive(Debug, Default)]
pub struct Phases {
    /// Batches committed (or attempted).
    pub batches: u32,
    /// The runner's reads: `head` and `read_all`.
    pub read: Duration,
    /// Hand-overs ([`Deliver::deliver`]): mapping the events, queueing the batch.
    pub map: Duration,
    /// From each batch's hand-over to its acknowledgement.
    pub delivered: Duration,
    /// The checkpoint commits (`commit_batch` without events).
    pub commit: Duration,
}

/// The shared clock of one run.
#[derive(Debug, Clone, Default)]
pub struct Clock(Arc<Mutex<Phases>>);

impl Clock {
    fn lock(&self) -> MutexGuard<'_, Phases> {
        // A poisoned lock only means a panic elsewhere in the bench, which aborts the run anyway.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The summed phases.
    pub fn take(&self) -> Phases {
        std::mem::take(&mut *self.lock())
    }
}

/// A projection whose handlers and flush are timed.
pub struct Timed<P> {
    inner: P,
    clock: Clock,
}

impl<P> Timed<P> {
    pub fn new(inner: P, clock: Clock) -> Self {
        Self { inner, clock }
    }
}

impl<P: Projection> Projection for Timed<P> {
    const NAME: &'static str = P::NAME;
    const EVENT_TYPES: &'static [&'static str] = P::EVENT_TYPES;
    const SUBSCRIPTION: Subscription = P::SUBSCRIPTION;
    type Context = P::Context;

    // A delivering runner calls neither `handle` nor `flush`.
    fn handle<'a>(
        &'a mut self,
        event: &'a RecordedEvent,
        context: &'a mut Self::Context,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send + 'a {
        self.inner.handle(event, context)
    }

    fn flush<'a>(
        &'a mut self,
        context: &'a mut Self::Context,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send + 'a {
        self.inner.flush(context)
    }

    fn discard(&mut self) {
        self.inner.discard();
    }
}

impl<P: Deliver> Deliver for Timed<P> {
    async fn deliver(&mut self, events: &[RecordedEvent]) -> Result<Delivery, ProjectionError> {
        let started = Instant::now();
        let delivery = self.inner.deliver(events).await?;
        self.clock.lock().map += started.elapsed();
        let clock = self.clock.clone();
        Ok(Box::pin(async move {
            let outcome = delivery.await;
            clock.lock().delivered += started.elapsed();
            outcome
        }))
    }
}

/// A store whose `head` and `read_all` are timed.
pub struct TimedStore<S> {
    inner: S,
    clock: Clock,
}

#[async_trait]
impl<S: EventStore> EventStore for TimedStore<S> {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        self.inner.append(stream, expected, events).await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: StreamVersion,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        self.inner.read_stream(stream, from, limit).await
    }

    async fn read_all(
        &self,
        after: Position,
        types: EventTypes<'_>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let started = Instant::now();
        let read = self.inner.read_all(after, types, limit).await;
        self.clock.lock().read += started.elapsed();
        read
    }

    async fn find_event(&self, id: EventId) -> Result<Option<RecordedEvent>, StoreError> {
        self.inner.find_event(id).await
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<StreamVersion, StoreError> {
        self.inner.stream_version(stream).await
    }

    async fn head(&self) -> Result<Option<Position>, StoreError> {
        let started = Instant::now();
        let head = self.inner.head().await;
        self.clock.lock().read += started.elapsed();
        head
    }

    async fn committed_head(&self) -> Result<Option<Position>, StoreError> {
        self.inner.committed_head().await
    }

    async fn wait_until_readable(&self, position: Position) -> Result<(), StoreError> {
        self.inner.wait_until_readable(position).await
    }

    async fn count_after(&self, after: Position, types: EventTypes<'_>) -> Result<u64, StoreError> {
        self.inner.count_after(after, types).await
    }

    async fn count_between(
        &self,
        after: Position,
        until: Position,
        types: EventTypes<'_>,
    ) -> Result<u64, StoreError> {
        self.inner.count_between(after, until, types).await
    }

    async fn wait_for_append(&self, after: Position, timeout: Duration) {
        self.inner.wait_for_append(after, timeout).await;
    }
}

/// A projection backend whose batch commits are timed, reading through a [`TimedStore`].
pub struct TimedBackend<B, S> {
    inner: B,
    store: TimedStore<S>,
}

impl<B, S> TimedBackend<B, S> {
    pub fn new(inner: B, store: S, clock: Clock) -> Self {
        Self {
            inner,
            store: TimedStore {
                inner: store,
                clock,
            },
        }
    }
}

impl<P, B, S> ProjectionBackend<Timed<P>> for TimedBackend<B, S>
where
    P: Projection,
    B: ProjectionBackend<Timed<P>>,
    S: EventStore,
{
    fn events(&self) -> &dyn EventStore {
        &self.store
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        self.inner.load_checkpoint(name).await
    }

    async fn commit_batch(
        &self,
        projection: &mut Timed<P>,
        name: &str,
        expected: Option<Position>,
        events: &[RecordedEvent],
        to: Position,
    ) -> Result<(), BatchError> {
        let started = Instant::now();
        let outcome = self
            .inner
            .commit_batch(projection, name, expected, events, to)
            .await;
        let mut phases = self.store.clock.lock();
        phases.batches += 1;
        phases.commit += started.elapsed();
        outcome
    }

    async fn reset_checkpoint(&self, name: &str) -> Result<(), StoreError> {
        self.inner.reset_checkpoint(name).await
    }

    async fn record_skip(
        &self,
        name: &str,
        expected: Option<Position>,
        event: &SkipTarget,
        reason: &str,
    ) -> Result<(), StoreError> {
        self.inner.record_skip(name, expected, event, reason).await
    }

    async fn skipped_events(&self, name: &str) -> Result<Vec<SkippedEvent>, StoreError> {
        self.inner.skipped_events(name).await
    }

    async fn record_failure(
        &self,
        name: &str,
        failure: Option<&ProjectionFailure>,
    ) -> Result<(), StoreError> {
        self.inner.record_failure(name, failure).await
    }

    async fn last_failure(&self, name: &str) -> Result<Option<RecordedFailure>, StoreError> {
        self.inner.last_failure(name).await
    }

    async fn acquire_lease(&self, name: &str) -> Result<Option<Box<dyn Lease>>, StoreError> {
        self.inner.acquire_lease(name).await
    }

    async fn wait_for_append(&self, after: Position, timeout: Duration) {
        self.inner.wait_for_append(after, timeout).await;
    }
}
