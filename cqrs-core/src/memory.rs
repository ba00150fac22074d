//! An in-memory backend implementing every storage trait: for tests, examples and prototypes.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use tokio::sync::watch;

use crate::admin::{
    validate_listing, CheckpointInfo, HorizonReport, LeaseHolder, StoreAdmin, StreamSummary,
    StreamTypeSummary,
};
use crate::backend::{
    resolve_retry, validate_append, validate_checkpoint_name, validate_snapshot, validate_types,
    StoredEventRef,
};
use crate::checkpoint::CheckpointStore;
use crate::event::{EventId, NewEvent, RecordedEvent};
use crate::json::RawJson;
use crate::projection::Projection;
use crate::snapshot::{Snapshot, SnapshotStore};
use crate::store::{AppendResult, ConcurrencyError, EventStore, EventTypes, StoreError};
use crate::stream::{ExpectedVersion, Position, StreamId, StreamVersion};
use crate::subscription::SkippedEvent;

/// Events, snapshots and checkpoints in process memory, safe to share between tasks (clone it: clones
/// share the same data). Appends are serialized, so log order is commit order and every batch gets its
/// own `tx` in [`Position`].
#[derive(Clone)]
pub struct InMemoryStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for InMemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InMemoryStore")
            .field("head", &*self.inner.head.borrow())
            .finish_non_exhaustive()
    }
}

struct Inner {
    log: tokio::sync::RwLock<Log>,
    inline: RwLock<Vec<Arc<dyn InlineHook>>>,
    snapshots: RwLock<HashMap<StreamId, Snapshot>>,
    checkpoints: RwLock<HashMap<String, Position>>,
    head: watch::Sender<Position>,
}

#[derive(Default)]
struct Log {
    events: Vec<RecordedEvent>,
    streams: HashMap<StreamId, Vec<usize>>,
    ids: HashMap<EventId, usize>,
    batches: u64,
}

impl Log {
    fn version(&self, stream: &StreamId) -> StreamVersion {
        StreamVersion::new(self.streams.get(stream).map_or(0, |s| s.len() as u64))
    }
}

impl Default for InMemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl InMemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                log: tokio::sync::RwLock::default(),
                inline: RwLock::default(),
                snapshots: RwLock::default(),
                checkpoints: RwLock::default(),
                head: watch::channel(Position::START).0,
            }),
        }
    }

    /// A receiver that changes to the new head position after every append; subscriptions wait on it.
    pub fn watch_head(&self) -> watch::Receiver<Position> {
        self.inner.head.subscribe()
    }

    /// Runs an inline projection in every append of this store (and of every clone: they share
    /// the data): the append runs it on the new events before they become visible, and a handler
    /// error fails the append, so events and read model always agree. Handlers run on a copy of
    /// the read model that replaces it only when the append commits (hence `Clone`); read the
    /// model through your clone of `model`.
    ///
    /// ```
    /// use cqrs_core::memory::{InMemoryStore, InlineReadModel};
    /// use cqrs_core::{event, projection};
    /// use serde::{Deserialize, Serialize};
    ///
    /// #[event(name = "Deposited")]
    /// #[derive(Debug, Clone, Serialize, Deserialize)]
    /// pub struct Deposited { pub amount: i64 }
    ///
    /// #[derive(Debug, Clone, Default)]
    /// pub struct Total { pub sum: i64 }
    ///
    /// #[projection(name = "total")]
    /// impl Total {
    ///     fn deposited(&mut self, event: &Deposited) { self.sum += event.amount }
    /// }
    ///
    /// let total = InlineReadModel::new(Total::default());
    /// let store = InMemoryStore::new().with_inline(total.clone());
    /// assert_eq!(total.read(|t| t.sum), 0);
    /// ```
    pub fn with_inline<P>(self, model: InlineReadModel<P>) -> Self
    where
        P: Projection<Context = ()> + Clone + Sync,
    {
        let hook: Arc<dyn InlineHook> = Arc::new(model);
        self.inner
            .inline
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(hook);
        self
    }

    /// Stores a raw event as an older release (or a bug, or another tool) might have written it,
    /// bypassing validation and the version check: for upcasting and bad-data tests.
    #[doc(hidden)]
    pub async fn insert_raw(&self, stream: &StreamId, event: NewEvent) -> RecordedEvent {
        let mut log = self.inner.log.write().await;
        let version = log.version(stream).next();
        log.batches += 1;
        let recorded = record(&log, stream, version, event);
        push(&mut log, recorded.clone());
        drop(log);
        self.inner.head.send_replace(recorded.position);
        recorded
    }
}

fn record(log: &Log, stream: &StreamId, version: StreamVersion, event: NewEvent) -> RecordedEvent {
    RecordedEvent {
        event_id: event.event_id,
        stream: stream.clone(),
        stream_version: version,
        position: Position::new(log.batches, log.events.len() as u64 + 1),
        event_type: event.event_type,
        schema_version: event.schema_version,
        recorded_at: Utc::now(),
        payload: RawJson::from(&event.payload),
        raw_metadata: event.metadata.to_json(),
    }
}

fn push(log: &mut Log, event: RecordedEvent) {
    let index = log.events.len();
    log.ids.insert(event.event_id, index);
    log.streams
        .entry(event.stream.clone())
        .or_default()
        .push(index);
    log.events.push(event);
}

#[async_trait]
impl EventStore for InMemoryStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        validate_append(stream, &events)?;
        let mut log = self.inner.log.write().await;
        let stored: Vec<StoredEventRef> = events
            .iter()
            .filter_map(|e| log.ids.get(&e.event_id))
            .map(|&i| {
                let e = &log.events[i];
                StoredEventRef {
                    event_id: e.event_id,
                    stream: e.stream.clone(),
                    stream_version: e.stream_version,
                    position: e.position,
                }
            })
            .collect();
        if !stored.is_empty() {
            return resolve_retry(stream, &events, &stored);
        }
        let actual = log.version(stream);
        if !expected.is_satisfied_by(actual) {
            return Err(ConcurrencyError {
                stream: stream.clone(),
                expected,
                actual,
            }
            .into());
        }
        log.batches += 1;
        let mut version = actual;
        let mut recorded = Vec::with_capacity(events.len());
        for event in events {
            version = version.next();
            let next = record(&log, stream, version, event);
            // `record` numbers by log length; account for the events staged before this one.
            let sequence = next.position.sequence + recorded.len() as u64;
            recorded.push(RecordedEvent {
                position: Position::new(next.position.tx, sequence),
                ..next
            });
        }
        // Inline projections see the events before anyone else and decide with them: all commit, or
        // the append fails and nothing (events or read-model changes) is kept.
        let hooks = self
            .inner
            .inline
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut commits = Vec::with_capacity(hooks.len());
        for hook in &hooks {
            match hook.stage(&recorded).await {
                Ok(commit) => commits.push(commit),
                Err(error) => {
                    log.batches -= 1;
                    return Err(StoreError::InlineProjection(error));
                }
            }
        }
        for event in recorded {
            push(&mut log, event);
        }
        for commit in commits {
            commit();
        }
        let position = log.events.last().map_or(Position::START, |e| e.position);
        drop(log);
        self.inner.head.send_replace(position);
        Ok(AppendResult {
            stream_version: version,
            position,
        })
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: StreamVersion,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        stream.validate()?;
        let log = self.inner.log.read().await;
        let Some(indices) = log.streams.get(stream) else {
            return Ok(Vec::new());
        };
        let skip = usize::try_from(from.get().saturating_sub(1)).unwrap_or(usize::MAX);
        Ok(indices
            .iter()
            .skip(skip)
            .take(limit)
            .map(|&i| log.events[i].clone())
            .collect())
    }

    async fn read_all(
        &self,
        after: Position,
        types: EventTypes<'_>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        validate_types(types)?;
        let log = self.inner.log.read().await;
        // Positions are dense from 1 in the in-memory log, so the sequence is the index + 1.
        let start = usize::try_from(after.sequence).unwrap_or(usize::MAX);
        Ok(log
            .events
            .iter()
            .skip(start)
            .filter(|e| types.matches(&e.event_type))
            .take(limit)
            .cloned()
            .collect())
    }

    async fn find_event(&self, id: EventId) -> Result<Option<RecordedEvent>, StoreError> {
        let log = self.inner.log.read().await;
        Ok(log.ids.get(&id).map(|&index| log.events[index].clone()))
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<StreamVersion, StoreError> {
        stream.validate()?;
        let log = self.inner.log.read().await;
        Ok(log.version(stream))
    }

    async fn head(&self) -> Result<Option<Position>, StoreError> {
        let log = self.inner.log.read().await;
        Ok(log.events.last().map(|e| e.position))
    }

    async fn count_after(&self, after: Position, types: EventTypes<'_>) -> Result<u64, StoreError> {
        validate_types(types)?;
        let log = self.inner.log.read().await;
        let start = usize::try_from(after.sequence).unwrap_or(usize::MAX);
        Ok(log
            .events
            .iter()
            .skip(start)
            .filter(|e| types.matches(&e.event_type))
            .count() as u64)
    }

    async fn count_between(
        &self,
        after: Position,
        until: Position,
        types: EventTypes<'_>,
    ) -> Result<u64, StoreError> {
        validate_types(types)?;
        let log = self.inner.log.read().await;
        let start = usize::try_from(after.sequence).unwrap_or(usize::MAX);
        let end = usize::try_from(until.sequence).unwrap_or(usize::MAX);
        Ok(log
            .events
            .iter()
            .take(end)
            .skip(start)
            .filter(|e| types.matches(&e.event_type))
            .count() as u64)
    }

    async fn wait_for_append(&self, after: Position, timeout: Duration) {
        let mut head = self.watch_head();
        let _ = tokio::time::timeout(timeout, head.wait_for(|h| *h > after)).await;
    }
}

#[async_trait]
impl SnapshotStore for InMemoryStore {
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        stream.validate()?;
        let snapshots = self
            .inner
            .snapshots
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(snapshots.get(stream).cloned())
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        validate_snapshot(&snapshot)?;
        let mut snapshots = self
            .inner
            .snapshots
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let newer_stored = snapshots
            .get(&snapshot.stream)
            .is_some_and(|s| s.stream_version > snapshot.stream_version);
        if !newer_stored {
            snapshots.insert(snapshot.stream.clone(), snapshot);
        }
        Ok(())
    }
}

#[async_trait]
impl CheckpointStore for InMemoryStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        validate_checkpoint_name(name)?;
        let checkpoints = self
            .inner
            .checkpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        Ok(checkpoints.get(name).copied())
    }

    async fn save_checkpoint(
        &self,
        name: &str,
        expected: Option<Position>,
        new: Position,
    ) -> Result<(), StoreError> {
        validate_checkpoint_name(name)?;
        let mut checkpoints = self
            .inner
            .checkpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let actual = checkpoints.get(name).copied();
        if actual != expected {
            return Err(StoreError::CheckpointConflict {
                name: name.to_owned(),
                expected,
                actual,
            });
        }
        checkpoints.insert(name.to_owned(), new);
        Ok(())
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<(), StoreError> {
        validate_checkpoint_name(name)?;
        let mut checkpoints = self
            .inner
            .checkpoints
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        checkpoints.remove(name);
        Ok(())
    }
}

/// A read model kept up to date inside the in-memory store's appends (see
/// [`InMemoryStore::with_inline`]). Clones share the model.
pub struct InlineReadModel<P> {
    state: Arc<RwLock<P>>,
}

impl<P> std::fmt::Debug for InlineReadModel<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineReadModel")
            .field("model", &std::any::type_name::<P>())
            .finish_non_exhaustive()
    }
}

impl<P> Clone for InlineReadModel<P> {
    fn clone(&self) -> Self {
        Self {
            state: Arc::clone(&self.state),
        }
    }
}

impl<P> InlineReadModel<P> {
    /// A read model starting from `projection`'s state, to register with
    /// [`InMemoryStore::with_inline`].
    pub fn new(projection: P) -> Self {
        Self {
            state: Arc::new(RwLock::new(projection)),
        }
    }
}

impl<P: Clone> InlineReadModel<P> {
    /// A copy of the read model as of the last committed append.
    pub fn snapshot(&self) -> P {
        self.state
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the model without copying it.
    pub fn read<T>(&self, f: impl FnOnce(&P) -> T) -> T {
        f(&self.state.read().unwrap_or_else(PoisonError::into_inner))
    }
}

type Commit = Box<dyn FnOnce() + Send>;

/// Type-erased inline projection: apply events to a staged copy, return how to commit it.
trait InlineHook: Send + Sync {
    fn stage<'a>(
        &'a self,
        events: &'a [RecordedEvent],
    ) -> futures_util::future::BoxFuture<'a, Result<Commit, crate::projection::ProjectionError>>;
}

impl<P: Projection<Context = ()> + Clone + Sync> InlineHook for InlineReadModel<P> {
    fn stage<'a>(
        &'a self,
        events: &'a [RecordedEvent],
    ) -> futures_util::future::BoxFuture<'a, Result<Commit, crate::projection::ProjectionError>>
    {
        Box::pin(async move {
            let mut staged = self.snapshot();
            // A failure drops `staged`, and with it anything buffered.
            crate::backend::apply_batch(&mut staged, events, &mut ())
                .await
                .map_err(|(_, error)| error)?;
            let state = Arc::clone(&self.state);
            let commit: Commit = Box::new(move || {
                *state.write().unwrap_or_else(PoisonError::into_inner) = staged;
            });
            Ok(commit)
        })
    }
}

/// The in-memory store keeps no leases, skips or failures itself: those of its projections live in their
/// [`InProcess`](crate::subscription::InProcess) backend, in the same process, whose
/// [`ProjectionHandle::status`](crate::subscription::ProjectionHandle::status) shows them. Its
/// log has no visibility horizon: an event is readable when its append returns.
#[async_trait]
impl StoreAdmin for InMemoryStore {
    async fn stream_types(&self) -> Result<Vec<StreamTypeSummary>, StoreError> {
        let log = self.inner.log.read().await;
        let mut types: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for (stream, indices) in &log.streams {
            let entry = types.entry(stream.stream_type()).or_default();
            entry.0 += 1;
            entry.1 += indices.len() as u64;
        }
        Ok(types
            .into_iter()
            .map(|(name, (streams, events))| {
                StreamTypeSummary::new(name.to_owned(), streams, events)
            })
            .collect())
    }

    async fn list_streams(
        &self,
        stream_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StreamSummary>, StoreError> {
        let limit = validate_listing(stream_type, after, limit)?;
        let log = self.inner.log.read().await;
        let mut streams: Vec<StreamSummary> = log
            .streams
            .iter()
            .filter(|(stream, _)| {
                stream.stream_type() == stream_type
                    && after.is_none_or(|after| stream.id().as_bytes() > after.as_bytes())
            })
            .filter_map(|(stream, indices)| {
                let last = &log.events[*indices.last()?];
                Some(StreamSummary::new(
                    stream.clone(),
                    StreamVersion::new(indices.len() as u64),
                    last.recorded_at,
                ))
            })
            .collect();
        streams.sort_by(|a, b| a.stream.id().as_bytes().cmp(b.stream.id().as_bytes()));
        streams.truncate(limit);
        Ok(streams)
    }

    async fn checkpoints(&self) -> Result<Vec<CheckpointInfo>, StoreError> {
        let checkpoints = self
            .inner
            .checkpoints
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        let mut list: Vec<CheckpointInfo> = checkpoints
            .iter()
            .map(|(name, position)| CheckpointInfo::new(name.clone(), *position, None))
            .collect();
        list.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(list)
    }

    async fn lease_holder(&self, name: &str) -> Result<Option<LeaseHolder>, StoreError> {
        validate_checkpoint_name(name)?;
        Ok(None)
    }

    async fn skipped(&self, name: &str) -> Result<Vec<SkippedEvent>, StoreError> {
        validate_checkpoint_name(name)?;
        Ok(Vec::new())
    }

    async fn last_failure(
        &self,
        name: &str,
    ) -> Result<Option<crate::subscription::RecordedFailure>, StoreError> {
        validate_checkpoint_name(name)?;
        Ok(None)
    }

    async fn horizon_report(&self) -> Result<HorizonReport, StoreError> {
        Ok(HorizonReport::new(
            0,
            None,
            "in memory: every appended event is readable at once".to_owned(),
        ))
    }
}

#[cfg(test)]
mod conformance {
    async fn fresh() -> super::InMemoryStore {
        super::InMemoryStore::new()
    }
    crate::backend_conformance_tests!(fresh);
    crate::admin_conformance_tests!(fresh);

    async fn fresh_projections() -> crate::subscription::InProcess<super::InMemoryStore> {
        crate::subscription::InProcess::new(super::InMemoryStore::new())
    }
    async fn fresh_inline() -> (
        super::InMemoryStore,
        crate::conformance::projections::Recorder<()>,
    ) {
        let recorder = crate::conformance::projections::Recorder::default();
        let model = super::InlineReadModel::new(recorder.clone());
        (super::InMemoryStore::new().with_inline(model), recorder)
    }
    crate::projection_conformance_tests!(fresh_projections, context = (), inline = fresh_inline);
}
