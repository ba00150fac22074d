//! Command execution: load an aggregate, decide, append with the version it was loaded at.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use serde_json::Value;
use tracing::Instrument;
use uuid::Uuid;

use crate::aggregate::{Aggregate, Handle, HandleWith};
use crate::event::{
    EncodeError, EventId, EventSet, Metadata, NewEvent, RecordedEvent, ReplayEvent,
};
use crate::snapshot::{Snapshot, SnapshotPolicy, SnapshotStore};
use crate::store::{
    read_stream_batched, replay_stream_batched, AppendResult, ConcurrencyError, EventStore,
    StoreError,
};
use crate::stream::{ExpectedVersion, Position, StreamId, StreamVersion};
use crate::upcast::DecodeError;

/// Default number of events a [`Repository`] fetches per round trip while loading an aggregate.
/// Larger than the log readers' [`DEFAULT_BATCH_SIZE`](crate::store::DEFAULT_BATCH_SIZE): a
/// replay page holds no metadata, and most streams then load in one round trip. Memory stays
/// bounded by one page (with 1 KB payloads, about 4 MB); lower it with
/// [`Repository::with_batch_size`] for much larger payloads.
pub const DEFAULT_LOAD_BATCH_SIZE: usize = 4096;

/// Who is asking and why: the command's id, what caused it, the correlation id carried from the
/// caller, and custom metadata copied onto every event.
///
/// The events a command produces are stamped with `causation_id` = the command's cause if it has one
/// (the event a process manager reacted to, see [`CommandContext::caused_by`]), else the command id;
/// and `correlation_id` = the conversation's id (the first command's id unless one is carried in).
#[derive(Debug, Clone, PartialEq)]
pub struct CommandContext {
    /// This command's id.
    pub command_id: Uuid,
    /// The message (usually an event) that caused this command, if any.
    pub causation_id: Option<Uuid>,
    /// The conversation it belongs to; defaults to the command id (a new conversation).
    pub correlation_id: Option<Uuid>,
    /// Copied into every produced event's [`Metadata::custom`] (user id, tenant, ...).
    pub custom: BTreeMap<String, Value>,
    /// Whether `command_id` is stable across retries of the same command (see
    /// [`CommandContext::with_command_id`]).
    idempotent: bool,
}

impl Default for CommandContext {
    fn default() -> Self {
        Self::new()
    }
}

impl CommandContext {
    /// A context for a new conversation, with a fresh command id.
    pub fn new() -> Self {
        Self {
            command_id: Uuid::now_v7(),
            causation_id: None,
            correlation_id: None,
            custom: BTreeMap::new(),
            idempotent: false,
        }
    }

    /// Gives the command a stable id (an idempotency key, e.g. from a client's request header):
    /// executing a command with an id that was already applied to its aggregate appends nothing
    /// and returns the original outcome ([`CommandOutcome::replayed`]), also after a restart,
    /// from another process, and when the two executions run concurrently. Its events get ids
    /// derived from the command id ([`EventId::derived`](crate::EventId::derived)), which the
    /// store recognises.
    pub fn with_command_id(mut self, command_id: Uuid) -> Self {
        self.command_id = command_id;
        self.idempotent = true;
        self
    }

    /// Whether the command id is stable across retries (set by
    /// [`CommandContext::with_command_id`] and [`CommandContext::caused_by`]).
    pub fn is_idempotent(&self) -> bool {
        self.idempotent
    }

    /// A context for a command issued in reaction to `event` by `reaction` (a process manager or
    /// saga, named so that two reactions to one event are two commands): the event is the cause,
    /// its conversation continues, and the command id is derived from the event's id and the
    /// reaction, so a redelivered event yields the same command id and the command is applied
    /// once (see [`CommandContext::with_command_id`]).
    ///
    /// Fails with [`DecodeError::Metadata`] if the event's stored metadata cannot be read: the
    /// conversation it belongs to would be lost.
    pub fn caused_by(event: &RecordedEvent, reaction: &str) -> Result<Self, DecodeError> {
        let metadata = event.metadata()?;
        let mut name = event.event_id.as_uuid().as_bytes().to_vec();
        name.extend_from_slice(reaction.as_bytes());
        Ok(Self {
            command_id: Uuid::new_v5(&REACTIONS, &name),
            idempotent: true,
            causation_id: Some(*event.event_id.as_uuid()),
            correlation_id: Some(metadata.correlation_id.unwrap_or(*event.event_id.as_uuid())),
            custom: metadata.custom,
        })
    }

    /// Joins an existing conversation.
    pub fn with_correlation_id(mut self, id: Uuid) -> Self {
        self.correlation_id = Some(id);
        self
    }

    /// Adds a custom metadata key/value.
    pub fn with(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.custom.insert(key.into(), value.into());
        self
    }

    fn metadata(&self) -> Metadata {
        Metadata {
            correlation_id: Some(self.correlation_id.unwrap_or(self.command_id)),
            causation_id: Some(self.causation_id.unwrap_or(self.command_id)),
            custom: self.custom.clone(),
        }
    }
}

/// The UUID v5 namespace of the command ids [`CommandContext::caused_by`] derives. Fixed forever:
/// redelivered events must keep yielding the same command ids.
const REACTIONS: Uuid = Uuid::from_u128(0x0d3f_62a8_41c7_4e5b_9a0e_7b18_c2f9_5e64);

/// What a successful command did.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandOutcome<E> {
    /// The aggregate's stream.
    pub stream: StreamId,
    /// The events the command produced (empty if it decided nothing needed to happen).
    pub events: Vec<E>,
    /// The stream's version after the command.
    pub stream_version: StreamVersion,
    /// The global position of the last event written, the read-your-own-writes token; `None` if no
    /// event was written.
    pub position: Option<Position>,
    /// How many times the command was decided (more than 1 after concurrency retries; 0 when
    /// replayed).
    pub attempts: u32,
    /// `true`: the command's id had already been applied ([`CommandContext::with_command_id`]);
    /// nothing was written, and `events`, `stream_version` and `position` are the original
    /// outcome's.
    pub replayed: bool,
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecuteError<E> {
    /// The aggregate rejected the command.
    #[error("command rejected")]
    Domain(#[source] E),
    /// Another writer appended to the stream first (after any configured retries).
    #[error(transparent)]
    Concurrency(ConcurrencyError),
    /// A stored event of the aggregate could not be decoded.
    #[error(transparent)]
    Decode(UndecodableEvent),
    /// A produced event could not be encoded.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The store failed.
    #[error(transparent)]
    Store(StoreError),
}

impl<E> From<StoreError> for ExecuteError<E> {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Concurrency(c) => ExecuteError::Concurrency(c),
            other => ExecuteError::Store(other),
        }
    }
}

impl<E> From<LoadError> for ExecuteError<E> {
    fn from(error: LoadError) -> Self {
        match error {
            LoadError::Store(e) => e.into(),
            LoadError::Decode(undecodable) => ExecuteError::Decode(undecodable),
        }
    }
}

impl<E> ExecuteError<E> {
    /// Converts the domain error, keeping every other case.
    pub fn map_domain<F>(self, f: impl FnOnce(E) -> F) -> ExecuteError<F> {
        match self {
            ExecuteError::Domain(e) => ExecuteError::Domain(f(e)),
            ExecuteError::Concurrency(c) => ExecuteError::Concurrency(c),
            ExecuteError::Decode(undecodable) => ExecuteError::Decode(undecodable),
            ExecuteError::Encode(e) => ExecuteError::Encode(e),
            ExecuteError::Store(e) => ExecuteError::Store(e),
        }
    }
}

/// A stored event of an aggregate that could not be decoded, and where it is.
#[derive(Debug, thiserror::Error)]
#[error("cannot load `{stream}`: event at version {stream_version} (position {position}) failed to decode")]
#[non_exhaustive]
pub struct UndecodableEvent {
    /// The aggregate's stream.
    pub stream: StreamId,
    /// The undecodable event's version.
    pub stream_version: StreamVersion,
    /// Its global position.
    pub position: Position,
    /// Why.
    #[source]
    pub source: DecodeError,
}

/// Why an aggregate could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored event could not be decoded.
    #[error(transparent)]
    Decode(#[from] UndecodableEvent),
}

/// The pauses before each re-send of a batch whose append outcome is unknown
/// ([`StoreError::OutcomeUnknown`]): a few short, growing ones, so that a command rides out a
/// dropped connection and still fails well within a caller's timeout when the store stays away.
const RESEND_PAUSES: [Duration; 4] = [
    Duration::from_millis(20),
    Duration::from_millis(60),
    Duration::from_millis(150),
    Duration::from_millis(300),
];

/// Opt-in re-execution after a concurrency conflict: reload, decide again, append again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    max_retries: u32,
    backoff: Duration,
}

impl RetryPolicy {
    /// Never retry: a conflict is returned to the caller (the default).
    pub const fn none() -> Self {
        Self {
            max_retries: 0,
            backoff: Duration::ZERO,
        }
    }

    /// Retry up to `max_retries` times, immediately.
    pub const fn retries(max_retries: u32) -> Self {
        Self {
            max_retries,
            backoff: Duration::ZERO,
        }
    }

    /// Waits `backoff * attempt` (plus jitter of up to one `backoff`) before each retry.
    pub const fn with_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    fn delay(&self, attempt: u32) -> Duration {
        if self.backoff.is_zero() {
            return Duration::ZERO;
        }
        let jitter = u64::from(Uuid::now_v7().as_u128() as u16) * self.backoff.as_micros() as u64
            / u64::from(u16::MAX);
        self.backoff * attempt + Duration::from_micros(jitter)
    }
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self::none()
    }
}

/// An aggregate's state as loaded from the store.
#[derive(Debug, Clone, PartialEq)]
pub struct Loaded<A> {
    /// The state after folding every loaded event.
    pub state: A,
    /// The version of the last event folded in ([`StreamVersion::INITIAL`] if none).
    pub version: StreamVersion,
}

/// Where to stop loading, for temporal queries.
#[derive(Debug, Clone, Copy)]
enum Until {
    Latest,
    Version(StreamVersion),
    Time(DateTime<Utc>),
}

struct Snapshots<A> {
    store: Arc<dyn SnapshotStore>,
    policy: SnapshotPolicy,
    encode: fn(&A) -> Result<Value, serde_json::Error>,
    decode: fn(&Value) -> Result<A, serde_json::Error>,
}

impl<A> Clone for Snapshots<A> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            policy: self.policy,
            encode: self.encode,
            decode: self.decode,
        }
    }
}

/// Loads aggregates and executes commands against them.
///
/// [`Repository::execute`] loads the aggregate (the latest snapshot, then the events after it),
/// asks [its `Handle` impl](crate::Handle) for a decision, and appends the events with
/// [the version it loaded](crate::ExpectedVersion::Exact): if another writer got there first,
/// nothing is written and the command fails with a conflict, or, with
/// [a retry policy](crate::RetryPolicy), is decided again on fresh state. An append whose
/// outcome is unknown (a reply lost after the write was sent) is re-sent as the same batch, never
/// decided again.
///
/// Cheap to clone (shares the store and the aggregate cache). The aggregate cache is on by
/// default ([`Repository::with_cache`]); snapshots and retries are opt-in.
///
/// ```
/// # use cqrs_core::prelude::*;
/// # use serde::{Deserialize, Serialize};
/// # #[event(name = "Added")]
/// # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// # pub struct Added { n: i64 }
/// # #[derive(Debug, Default, Clone, Serialize, Deserialize, Aggregate)]
/// # #[aggregate(name = "counter", events(Added))]
/// # pub struct Counter { total: i64 }
/// # impl Apply<Added> for Counter { fn apply(&mut self, e: &Added) { self.total += e.n } }
/// # pub struct Add(i64);
/// # impl Handle<Add> for Counter {
/// #     type Error = std::convert::Infallible;
/// #     fn handle(&self, c: &Add) -> Result<Vec<CounterEvent>, Self::Error> { Ok(vec![Added { n: c.0 }.into()]) }
/// # }
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let store = InMemoryStore::new();
/// // A snapshot every 100 events (kept in the same store), conflicts retried up to 3 times.
/// let counters = Repository::<Counter>::snapshotting(store, SnapshotPolicy::every(100))
///     .with_retry(RetryPolicy::retries(3));
///
/// let outcome = counters.execute("c-1", &Add(5)).await?;
/// assert_eq!(outcome.stream_version, StreamVersion::new(1));
/// // `outcome.position` is the read-your-own-writes token for `ProjectionHandle::wait_for`.
///
/// let loaded = counters.load("c-1").await?;
/// assert_eq!(loaded.state.total, 5);
/// # Ok(()) }
/// ```
pub struct Repository<A: Aggregate> {
    store: Arc<dyn EventStore>,
    snapshots: Option<Snapshots<A>>,
    retry: RetryPolicy,
    batch_size: usize,
    cache: Option<Arc<AggregateCache<A>>>,
}

impl<A: Aggregate> std::fmt::Debug for Repository<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repository")
            .field("aggregate", &A::TYPE)
            .field("snapshots", &self.snapshots.as_ref().map(|s| s.policy))
            .field("retry", &self.retry)
            .field("batch_size", &self.batch_size)
            .field("cache", &self.cache.as_ref().map(|c| c.capacity()))
            .finish_non_exhaustive()
    }
}

/// How many aggregates [`Repository::new`]'s cache holds (see [`Repository::with_cache`]).
pub const DEFAULT_CACHE_CAPACITY: usize = 10_000;

/// Aggregate states kept after commands, keyed by stream, least recently used evicted first. A
/// command takes its aggregate's entry out (so a concurrent command on the same stream loads from
/// the store instead) and puts the new state back after a successful append. The append's
/// expected-version check still guards every write: a stale entry ends in a conflict, which evicts
/// it and re-executes once from the store.
struct AggregateCache<A> {
    entries: std::sync::Mutex<hashlink::LruCache<StreamId, Loaded<A>>>,
}

impl<A> AggregateCache<A> {
    fn new(capacity: usize) -> Self {
        Self {
            entries: std::sync::Mutex::new(hashlink::LruCache::new(capacity)),
        }
    }

    fn take(&self, stream: &StreamId) -> Option<Loaded<A>> {
        self.lock().remove(stream)
    }

    fn put(&self, stream: StreamId, loaded: Loaded<A>) {
        // Inserting makes the entry the most recently used and, at capacity, drops the least.
        self.lock().insert(stream, loaded);
    }

    fn capacity(&self) -> usize {
        self.lock().capacity()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, hashlink::LruCache<StreamId, Loaded<A>>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl<A: Aggregate> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Self {
            store: Arc::clone(&self.store),
            snapshots: self.snapshots.clone(),
            retry: self.retry,
            batch_size: self.batch_size,
            cache: self.cache.clone(),
        }
    }
}

impl<A: Aggregate> Repository<A> {
    /// A repository over `store` with the defaults: the aggregate cache on, holding up to
    /// [`DEFAULT_CACHE_CAPACITY`] aggregates (see [`Repository::with_cache`]), no snapshots, no
    /// retries.
    pub fn new(store: impl EventStore) -> Self {
        Self::from_arc(Arc::new(store))
    }

    /// A repository over `store` that keeps its snapshots there too (every backend here stores
    /// both): loads start from the latest snapshot and `policy` says when to take a new one. For
    /// snapshots in another store, use [`Repository::with_snapshots`].
    pub fn snapshotting<S>(store: S, policy: SnapshotPolicy) -> Self
    where
        S: EventStore + SnapshotStore + Clone,
        A: serde::Serialize + serde::de::DeserializeOwned,
    {
        Self::new(store.clone()).with_snapshots(store, policy)
    }

    /// A repository over a shared, type-erased store.
    pub fn from_arc(store: Arc<dyn EventStore>) -> Self {
        Self {
            store,
            snapshots: None,
            retry: RetryPolicy::none(),
            batch_size: DEFAULT_LOAD_BATCH_SIZE,
            cache: Some(Arc::new(AggregateCache::new(DEFAULT_CACHE_CAPACITY))),
        }
    }

    /// Keeps up to `capacity` aggregate states in memory between commands (the least recently
    /// used is dropped first), so a command on a cached aggregate skips the load: one round trip
    /// instead of two, and a cost per command that does not grow with the stream. On by default
    /// with [`DEFAULT_CACHE_CAPACITY`]; `capacity` 0 turns it off ([`Repository::without_cache`]).
    ///
    /// Memory: each entry is the aggregate's state (its size plus what it owns on the heap), its
    /// stream id and a few words of bookkeeping; size `capacity` by how many aggregates are
    /// commanded repeatedly and how large their states are.
    ///
    /// Correct with several processes or writers: the cache is only a hint. Every append still
    /// checks the version the state was loaded at; a stale entry ends in a conflict, which evicts it
    /// and decides again on the state read from the store. The state after a command is the cached
    /// state with the new events applied as decided, not as re-read, so events must read back as
    /// they were written (a field that serde skips on write would differ). A decision that appends
    /// nothing (a rejection, a no-op) gets no version check, so on a cached state it first reads
    /// what the stream has after that state (one round trip, usually empty) and, if the stream
    /// moved, decides again on the current state: a stale entry never rejects a command.
    ///
    /// Clones of this repository share the cache.
    pub fn with_cache(mut self, capacity: usize) -> Self {
        self.cache = (capacity > 0).then(|| Arc::new(AggregateCache::new(capacity)));
        self
    }

    /// Loads every aggregate from the store (or its snapshot) for every command.
    pub fn without_cache(self) -> Self {
        self.with_cache(0)
    }

    /// Loads from the latest snapshot in `store` (if its [`Aggregate::SNAPSHOT_VERSION`] matches)
    /// and takes a new one according to `policy`. When the event store keeps the snapshots too,
    /// [`Repository::snapshotting`] says it once.
    pub fn with_snapshots(mut self, store: impl SnapshotStore, policy: SnapshotPolicy) -> Self
    where
        A: serde::Serialize + serde::de::DeserializeOwned,
    {
        self.snapshots = Some(Snapshots {
            store: Arc::new(store),
            policy,
            encode: |state| serde_json::to_value(state),
            decode: |v| A::deserialize(v),
        });
        self
    }

    /// Retries commands that hit a concurrency conflict.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Events fetched per round trip while loading (default [`DEFAULT_LOAD_BATCH_SIZE`]).
    pub fn with_batch_size(mut self, batch_size: usize) -> Self {
        self.batch_size = batch_size.max(1);
        self
    }

    /// The store this repository writes to.
    pub fn store(&self) -> &Arc<dyn EventStore> {
        &self.store
    }

    /// The stream of aggregate instance `id`.
    pub fn stream_id(id: &str) -> StreamId {
        StreamId::new(A::TYPE, id)
    }

    /// Loads the current state of `id` (snapshot + later events, or a full replay).
    pub async fn load(&self, id: &str) -> Result<Loaded<A>, LoadError> {
        self.load_until(&Self::stream_id(id), Until::Latest).await
    }

    /// The state of `id` as it was at `version` (or its latest version, if lower), reading no later event.
    pub async fn load_at_version(
        &self,
        id: &str,
        version: StreamVersion,
    ) -> Result<Loaded<A>, LoadError> {
        self.load_until(&Self::stream_id(id), Until::Version(version))
            .await
    }

    /// The state of `id` as it was at instant `at`: every event recorded at or before it.
    pub async fn load_as_of(&self, id: &str, at: DateTime<Utc>) -> Result<Loaded<A>, LoadError> {
        self.load_until(&Self::stream_id(id), Until::Time(at)).await
    }

    async fn load_until(&self, stream: &StreamId, until: Until) -> Result<Loaded<A>, LoadError> {
        let loaded = match until {
            Until::Latest => self.load_snapshot(stream, None).await,
            Until::Version(v) => self.load_snapshot(stream, Some(v)).await,
            // A snapshot does not record when its last event happened; replay.
            Until::Time(_) => None,
        }
        .unwrap_or_else(|| Loaded {
            state: A::default(),
            version: StreamVersion::INITIAL,
        });
        self.replay_onto(stream, loaded, until).await
    }

    /// Applies the stream's events after `loaded.version` to `loaded`, up to `until`.
    async fn replay_onto(
        &self,
        stream: &StreamId,
        mut loaded: Loaded<A>,
        until: Until,
    ) -> Result<Loaded<A>, LoadError> {
        let batch = match until {
            Until::Version(v) => {
                let remaining = v.get().saturating_sub(loaded.version.get());
                if remaining == 0 {
                    return Ok(loaded);
                }
                usize::try_from(remaining).map_or(self.batch_size, |r| r.min(self.batch_size))
            }
            _ => self.batch_size,
        };
        let events = replay_stream_batched(&*self.store, stream, loaded.version.next(), batch);
        futures_util::pin_mut!(events);
        while let Some(recorded) = events.try_next().await? {
            match until {
                Until::Version(v) if recorded.stream_version > v => break,
                Until::Time(t) if recorded.recorded_at > t => break,
                _ => {}
            }
            let event = match recorded.decode_set::<A::Event>() {
                Ok(event) => event,
                Err(source) => {
                    return Err(self.undecodable_replayed(stream, &recorded, source).await)
                }
            };
            loaded.state.apply_event(&event);
            loaded.version = recorded.stream_version;
            if matches!(until, Until::Version(v) if loaded.version == v) {
                break;
            }
        }
        Ok(loaded)
    }

    /// The error for a replayed event that does not decode, naming its position: a replay read
    /// carries none, so it is looked up here, on the failure path only.
    async fn undecodable_replayed(
        &self,
        stream: &StreamId,
        event: &ReplayEvent,
        source: DecodeError,
    ) -> LoadError {
        let stored = match self
            .store
            .read_stream(stream, event.stream_version, 1)
            .await
        {
            Ok(stored) => stored,
            Err(error) => return LoadError::Store(error),
        };
        match stored.first() {
            Some(stored) if stored.stream_version == event.stream_version => {
                undecodable(stream, event.stream_version, stored.position, source)
            }
            _ => LoadError::Store(StoreError::Backend(
                format!(
                    "event {} of stream `{stream}` failed to decode and is no longer readable",
                    event.stream_version
                )
                .into(),
            )),
        }
    }

    /// The snapshot to start from, if there is a usable one. A snapshot that is missing, of another
    /// schema version, undecodable or past `at_most` means a full replay, never a wrong state.
    async fn load_snapshot(
        &self,
        stream: &StreamId,
        at_most: Option<StreamVersion>,
    ) -> Option<Loaded<A>> {
        let snapshots = self.snapshots.as_ref()?;
        let snapshot = match snapshots.store.load_snapshot(stream).await {
            Ok(Some(snapshot)) => snapshot,
            Ok(None) => return None,
            Err(error) => {
                tracing::warn!(%stream, %error, "snapshot unavailable; replaying the stream");
                return None;
            }
        };
        if snapshot.snapshot_version != A::SNAPSHOT_VERSION {
            tracing::debug!(%stream, stored = snapshot.snapshot_version, current = A::SNAPSHOT_VERSION,
                "ignoring snapshot of another schema version");
            return None;
        }
        if at_most.is_some_and(|v| snapshot.stream_version > v) {
            return None;
        }
        match (snapshots.decode)(&snapshot.payload) {
            Ok(state) => Some(Loaded {
                state,
                version: snapshot.stream_version,
            }),
            Err(error) => {
                tracing::warn!(%stream, %error, "undecodable snapshot ignored; replaying the stream");
                None
            }
        }
    }

    /// Executes `command` against aggregate `id` in a new conversation.
    pub async fn execute<C>(
        &self,
        id: &str,
        command: &C,
    ) -> Result<CommandOutcome<A::Event>, ExecuteError<<A as Handle<C>>::Error>>
    where
        A: Handle<C>,
        C: Sync,
    {
        self.execute_in(id, command, &CommandContext::new()).await
    }

    /// Executes `command` against aggregate `id` within `context` (correlation, causation, metadata).
    pub async fn execute_in<C>(
        &self,
        id: &str,
        command: &C,
        context: &CommandContext,
    ) -> Result<CommandOutcome<A::Event>, ExecuteError<<A as Handle<C>>::Error>>
    where
        A: Handle<C>,
        C: Sync,
    {
        self.run::<C, _>(id, context, Pure(command)).await
    }

    /// Executes a command whose handler needs `services` (see [`HandleWith`]), in a new
    /// conversation.
    pub async fn execute_with<C, S>(
        &self,
        id: &str,
        command: &C,
        services: &S,
    ) -> Result<CommandOutcome<A::Event>, ExecuteError<<A as HandleWith<C, S>>::Error>>
    where
        A: HandleWith<C, S>,
        C: Sync,
        S: ?Sized + Sync,
    {
        self.execute_with_in(id, command, services, &CommandContext::new())
            .await
    }

    /// Executes a command whose handler needs `services` within `context`.
    pub async fn execute_with_in<C, S>(
        &self,
        id: &str,
        command: &C,
        services: &S,
        context: &CommandContext,
    ) -> Result<CommandOutcome<A::Event>, ExecuteError<<A as HandleWith<C, S>>::Error>>
    where
        A: HandleWith<C, S>,
        C: Sync,
        S: ?Sized + Sync,
    {
        self.run::<C, _>(id, context, WithServices(command, services))
            .await
    }

    async fn run<C, D>(
        &self,
        id: &str,
        context: &CommandContext,
        decider: D,
    ) -> Result<CommandOutcome<A::Event>, ExecuteError<D::Error>>
    where
        D: Decide<A>,
    {
        let stream = Self::stream_id(id);
        let span = tracing::info_span!(
            "command",
            aggregate = A::TYPE,
            id,
            command = std::any::type_name::<C>(),
            command_id = %context.command_id,
            correlation_id = context.correlation_id.map(tracing::field::display),
        );
        let started = std::time::Instant::now();
        let result = async move {
            if context.idempotent {
                if let Some(outcome) = self.replayed(&stream, context).await? {
                    return Ok(outcome);
                }
            }
            let mut attempt = 0;
            let mut retries_left = self.retry.max_retries;
            // A state brought up to date after a decision on a cached one, to decide on next.
            let mut current = None;
            loop {
                attempt += 1;
                let (mut loaded, from_cache) = match current.take() {
                    Some(loaded) => (loaded, false),
                    None => match self.cache.as_ref().and_then(|c| c.take(&stream)) {
                        Some(loaded) => (loaded, true),
                        None => (self.load_until(&stream, Until::Latest).await?, false),
                    },
                };
                let decision = decider.decide(&loaded.state).await;
                if from_cache && !matches!(&decision, Ok(events) if !events.is_empty()) {
                    // Without an append, no expected-version check tells whether the cached
                    // state was current (another process may have written the stream): bring
                    // it up to date and, if it moved, decide again, so that a rejection or a
                    // no-op is never based on a stale entry.
                    let version = loaded.version;
                    loaded = self.replay_onto(&stream, loaded, Until::Latest).await?;
                    if loaded.version != version {
                        current = Some(loaded);
                        continue;
                    }
                }
                let events = match decision {
                    Ok(events) => events,
                    Err(domain) => {
                        // Deciding does not change the state: keep it cached.
                        if let Some(cache) = &self.cache {
                            cache.put(stream.clone(), loaded);
                        }
                        return Err(ExecuteError::Domain(domain));
                    }
                };
                match self.commit(&stream, loaded, events, context, attempt).await {
                    // The same command applied concurrently, with events other than these: the
                    // original outcome stands.
                    Err(ExecuteError::Store(StoreError::IdempotencyConflict { .. }))
                        if context.idempotent =>
                    {
                        if let Some(outcome) = self.replayed(&stream, context).await? {
                            return Ok(outcome);
                        }
                        return Err(ExecuteError::Store(StoreError::IdempotencyConflict {
                            event_id: EventId::derived(context.command_id, 0),
                            detail: "part of the command's events are stored".to_owned(),
                        }));
                    }
                    // A stale cache entry is not the caller's conflict: it is evicted; retry from the store.
                    Err(ExecuteError::Concurrency(_)) if from_cache => {}
                    Err(ExecuteError::Concurrency(conflict)) if retries_left > 0 => {
                        retries_left -= 1;
                        crate::metrics::command_retry(A::TYPE);
                        tracing::debug!(%conflict, attempt, "retrying after concurrency conflict");
                        tokio::time::sleep(self.retry.delay(attempt)).await;
                    }
                    result => return result,
                }
            }
        }
        .instrument(span)
        .await;
        let outcome = match &result {
            Ok(_) => crate::metrics::CommandOutcome::Ok,
            Err(ExecuteError::Domain(_)) => crate::metrics::CommandOutcome::Rejected,
            Err(ExecuteError::Concurrency(_)) => crate::metrics::CommandOutcome::Conflicted,
            Err(_) => crate::metrics::CommandOutcome::Failed,
        };
        crate::metrics::command(A::TYPE, outcome, started.elapsed());
        result
    }

    async fn commit<E>(
        &self,
        stream: &StreamId,
        loaded: Loaded<A>,
        events: Vec<A::Event>,
        context: &CommandContext,
        attempts: u32,
    ) -> Result<CommandOutcome<A::Event>, ExecuteError<E>> {
        if events.is_empty() {
            return Ok(CommandOutcome {
                stream: stream.clone(),
                events,
                stream_version: loaded.version,
                position: None,
                attempts,
                replayed: false,
            });
        }
        let metadata = context.metadata();
        let encoded = (0u32..)
            .zip(&events)
            .map(|(index, e)| {
                let event = NewEvent::from_set(e)?.with_metadata(metadata.clone());
                Ok(if context.idempotent {
                    NewEvent {
                        event_id: EventId::derived(context.command_id, index),
                        ..event
                    }
                } else {
                    event
                })
            })
            .collect::<Result<Vec<_>, EncodeError>>()?;
        let expected = ExpectedVersion::Exact(loaded.version);
        let count = encoded.len();
        let append_started = std::time::Instant::now();
        let appended = match self.append_resending(stream, expected, encoded).await {
            Ok(appended) => {
                crate::metrics::appended(A::TYPE, count, append_started.elapsed());
                appended
            }
            Err(error) => {
                if matches!(error, StoreError::OutcomeUnknown(_)) {
                    // The stream may be past the version this state was loaded at.
                    if let Some(cache) = &self.cache {
                        cache.take(stream);
                    }
                }
                return Err(error.into());
            }
        };
        self.after_append(stream, loaded, &events, appended.stream_version)
            .await;
        Ok(CommandOutcome {
            stream: stream.clone(),
            events,
            stream_version: appended.stream_version,
            position: Some(appended.position),
            attempts,
            replayed: false,
        })
    }

    /// If the idempotent command `context` was already applied to `stream`, its original
    /// outcome: its events are the ones with the ids derived from its command id, consecutive
    /// in the stream from the first.
    async fn replayed(
        &self,
        stream: &StreamId,
        context: &CommandContext,
    ) -> Result<Option<CommandOutcome<A::Event>>, LoadError> {
        let first = EventId::derived(context.command_id, 0);
        let Some(found) = self.store.find_event(first).await? else {
            return Ok(None);
        };
        if found.stream != *stream {
            return Err(LoadError::Store(StoreError::IdempotencyConflict {
                event_id: first,
                detail: format!(
                    "command {} was already applied to stream `{}`",
                    context.command_id, found.stream
                ),
            }));
        }
        let mut events = Vec::new();
        let mut last = (found.stream_version, found.position);
        let mut ids = (0u32..).map(|index| EventId::derived(context.command_id, index));
        let mut stored = std::pin::pin!(read_stream_batched(
            &*self.store,
            stream,
            found.stream_version,
            self.batch_size
        ));
        while let Some(event) = stored.try_next().await? {
            if ids.next() != Some(event.event_id) {
                break;
            }
            events.push(decode::<A::Event>(&event)?);
            last = (event.stream_version, event.position);
        }
        Ok(Some(CommandOutcome {
            stream: stream.clone(),
            events,
            stream_version: last.0,
            position: Some(last.1),
            attempts: 0,
            replayed: true,
        }))
    }

    /// Appends, and while the outcome is unknown (the reply was lost) re-sends the very same batch,
    /// after each pause of [`RESEND_PAUSES`]: same event ids and expectation, so the store's
    /// idempotent append answers with the original result if the batch was stored, or writes it
    /// now. Deciding again instead would make new ids and could store the command twice. A re-send
    /// that finds the store unreachable learns nothing, so the outcome stays unknown.
    async fn append_resending(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let mut unknown = match self.store.append(stream, expected, events.clone()).await {
            Err(StoreError::OutcomeUnknown(source)) => source,
            decided => return decided,
        };
        for pause in RESEND_PAUSES {
            tracing::debug!(%stream, error = %unknown, "append outcome unknown; re-sending the same events");
            tokio::time::sleep(pause).await;
            match self.store.append(stream, expected, events.clone()).await {
                Err(StoreError::OutcomeUnknown(source) | StoreError::Connection(source)) => {
                    unknown = source;
                }
                decided => return decided,
            }
        }
        Err(StoreError::OutcomeUnknown(unknown))
    }

    /// Brings the state up to the appended version for the cache, and takes a snapshot if the policy
    /// says so. The events are committed already, so a snapshot failure is logged, not returned: the
    /// next load replays a little more.
    async fn after_append(
        &self,
        stream: &StreamId,
        loaded: Loaded<A>,
        events: &[A::Event],
        version: StreamVersion,
    ) {
        let snapshot_due = self
            .snapshots
            .as_ref()
            .is_some_and(|s| s.policy.should_snapshot(loaded.version, version));
        if self.cache.is_none() && !snapshot_due {
            return;
        }
        let mut state = loaded.state;
        for event in events {
            state.apply_event(event);
        }
        if snapshot_due {
            self.save_snapshot(stream, &state, version).await;
        }
        if let Some(cache) = &self.cache {
            cache.put(stream.clone(), Loaded { state, version });
        }
    }

    async fn save_snapshot(&self, stream: &StreamId, state: &A, version: StreamVersion) {
        let Some(snapshots) = &self.snapshots else {
            return;
        };
        let payload = match (snapshots.encode)(state) {
            Ok(payload) => payload,
            Err(error) => {
                tracing::warn!(%stream, %error, "cannot encode snapshot");
                return;
            }
        };
        let snapshot = Snapshot {
            stream: stream.clone(),
            stream_version: version,
            snapshot_version: A::SNAPSHOT_VERSION,
            payload,
        };
        if let Err(error) = snapshots.store.save_snapshot(snapshot).await {
            tracing::warn!(%stream, %error, "cannot save snapshot");
        }
    }
}

fn decode<S: EventSet>(recorded: &RecordedEvent) -> Result<S, LoadError> {
    recorded.decode_set::<S>().map_err(|source| {
        undecodable(
            &recorded.stream,
            recorded.stream_version,
            recorded.position,
            source,
        )
    })
}

fn undecodable(
    stream: &StreamId,
    stream_version: StreamVersion,
    position: Position,
    source: DecodeError,
) -> LoadError {
    LoadError::Decode(UndecodableEvent {
        stream: stream.clone(),
        stream_version,
        position,
        source,
    })
}

/// A command decision against loaded state, pure or with services.
trait Decide<A: Aggregate>: Send + Sync {
    type Error;
    fn decide(&self, state: &A) -> impl Future<Output = Result<Vec<A::Event>, Self::Error>> + Send;
}

struct Pure<'c, C>(&'c C);

impl<A: Handle<C>, C: Sync> Decide<A> for Pure<'_, C> {
    type Error = <A as Handle<C>>::Error;
    async fn decide(&self, state: &A) -> Result<Vec<A::Event>, Self::Error> {
        state.handle(self.0)
    }
}

struct WithServices<'c, C, S: ?Sized>(&'c C, &'c S);

impl<A, C, S> Decide<A> for WithServices<'_, C, S>
where
    A: HandleWith<C, S>,
    C: Sync,
    S: ?Sized + Sync,
{
    type Error = <A as HandleWith<C, S>>::Error;
    fn decide(&self, state: &A) -> impl Future<Output = Result<Vec<A::Event>, Self::Error>> + Send {
        state.handle_with(self.0, self.1)
    }
}
