//! The event store: append with optimistic concurrency, read a stream, read the global log.

use std::collections::VecDeque;

use async_trait::async_trait;
use futures_util::stream::{self, Stream};

use crate::event::{EventId, NewEvent, RecordedEvent, ReplayEvent};
use crate::stream::{ExpectedVersion, InvalidId, Position, StreamId, StreamVersion};

/// Default number of events fetched per round trip by the streaming helpers and the repository.
pub const DEFAULT_BATCH_SIZE: usize = 512;

/// What an append wrote: the stream's new version and the global position of the last event.
///
/// The position is the read-your-own-writes token: wait for a projection to reach it before
/// querying the read model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppendResult {
    /// The stream's version after the append (the version of its last event).
    pub stream_version: StreamVersion,
    /// The global position of the last appended event.
    pub position: Position,
}

/// Which event types a global read returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EventTypes<'a> {
    /// Every event.
    #[default]
    All,
    /// Only events whose stored type name is in the list.
    Only(&'a [&'a str]),
}

impl EventTypes<'_> {
    /// Whether an event of this type passes the filter.
    pub fn matches(&self, event_type: &str) -> bool {
        match self {
            EventTypes::All => true,
            EventTypes::Only(types) => types.contains(&event_type),
        }
    }
}

/// The append was rejected because the stream is not at the expected version.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "concurrency conflict on stream `{stream}`: expected {expected}, but it is at version {actual}"
)]
pub struct ConcurrencyError {
    /// The stream appended to.
    pub stream: StreamId,
    /// What the writer expected.
    pub expected: ExpectedVersion,
    /// The stream's actual version at the time of the append.
    pub actual: StreamVersion,
}

/// A storage failure. Every backend reports through this type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Optimistic concurrency check failed; nothing was written.
    #[error(transparent)]
    Concurrency(#[from] ConcurrencyError),
    /// Some of the appended event ids are already stored, but not as exactly this batch on this
    /// stream. A full retry of an earlier append is not an error: it returns the original result.
    #[error("event id {event_id} is already stored ({detail}); nothing was written")]
    IdempotencyConflict {
        /// The first conflicting id.
        event_id: EventId,
        /// What differs from the stored batch.
        detail: String,
    },
    /// The same event id appears twice in one batch.
    #[error("event id {event_id} appears more than once in the batch; nothing was written")]
    DuplicateIdInBatch {
        /// The repeated id.
        event_id: EventId,
    },
    /// An append inside a caller's `REPEATABLE READ` or `SERIALIZABLE` transaction (a backend's
    /// `append_in`) did not meet `expected` as that transaction's snapshot sees the stream. Writes
    /// committed after the snapshot was taken are invisible to it (another transaction may have
    /// appended to the stream since), so the stream's current version cannot be known there.
    /// Nothing was written and the transaction stays usable; roll it back and retry the whole
    /// transaction, whose new snapshot sees the stream as it is.
    #[error(
        "cannot append to stream `{stream}` expecting {expected} in this transaction: its snapshot \
         sees version {snapshot_version} and not what was committed after it was taken; retry the \
         whole transaction"
    )]
    StaleSnapshot {
        /// The target stream.
        stream: StreamId,
        /// What the writer expected.
        expected: ExpectedVersion,
        /// The stream's version in the transaction's snapshot (possibly not its current one).
        snapshot_version: StreamVersion,
    },
    /// An append with no events.
    #[error("cannot append an empty batch to stream `{stream}`")]
    EmptyAppend {
        /// The target stream.
        stream: StreamId,
    },
    /// A stream id or event type name that cannot be stored.
    #[error(transparent)]
    InvalidId(#[from] InvalidId),
    /// An event's payload or metadata, or a snapshot, that not every backend can store and read
    /// back as given (see [`validate_json`](crate::backend::validate_json)); nothing was written.
    #[error("{what} cannot be stored: {reason}")]
    InvalidPayload {
        /// Which value ("payload of event …", "metadata of event …", "snapshot of …").
        what: String,
        /// Why.
        reason: String,
    },
    /// A stored row cannot be read back (corrupt JSON, bad column, unexpected NULL).
    #[error("stored event at position {position} is unreadable: {reason}")]
    CorruptEvent {
        /// Where the bad row is, so an operator can find it.
        position: Position,
        /// What is wrong with it.
        reason: String,
    },
    /// A checkpoint compare-and-set failed: another runner moved it.
    #[error("checkpoint `{name}` moved: expected {expected:?}, found {actual:?}")]
    CheckpointConflict {
        /// The checkpoint name.
        name: String,
        /// What the caller read.
        expected: Option<Position>,
        /// What is stored now.
        actual: Option<Position>,
    },
    /// Events up to `position` are committed but global reads cannot return them yet: a reader
    /// that must see everything committed before it asked (a catch-up, a rebuild) waited
    /// `waited` and gives up rather than report an incomplete result. On PostgreSQL a running
    /// transaction anywhere in the cluster holds the visibility horizon back; `held_by` says which.
    #[error("events up to position {position} are committed but not yet readable after waiting {waited:?}: {held_by}")]
    NotYetReadable {
        /// The last committed event the reader must reach.
        position: Position,
        /// How long the reader waited.
        waited: std::time::Duration,
        /// What holds readers back, as the backend reports it.
        held_by: String,
    },
    /// An inline projection rejected the appended events; nothing was written.
    #[error("an inline projection failed; nothing was written")]
    InlineProjection(#[source] crate::projection::ProjectionError),
    /// The backend could not be reached or the connection was lost; retrying later may succeed.
    /// Nothing was written if this is returned from an append.
    #[error("the storage connection failed; nothing was written")]
    Connection(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An append was sent but its reply was lost (the connection dropped after the statement or
    /// its commit went out): the events may or may not be stored. Re-send the same batch, with
    /// the same event ids: the idempotent append then returns the original result if the batch
    /// was stored, or writes it now. [`crate::Repository`] does this itself before it reports
    /// this error. Deciding again with new events instead could store the command's effect twice.
    #[error("the append was sent but its reply was lost: the events may or may not be stored")]
    OutcomeUnknown(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// Any other backend failure.
    #[error(transparent)]
    Backend(Box<dyn std::error::Error + Send + Sync>),
}

impl StoreError {
    /// Whether retrying the same call later may succeed (lost connection, pool exhausted).
    ///
    /// `false` for [`StoreError::OutcomeUnknown`]: the events may be stored already, so only a
    /// re-send of the very same batch is safe, not a retry of the command that produced it (which
    /// decides again and makes new event ids).
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Connection(_))
    }
}

/// An error and its sources, as one line (`outer: inner: innermost`): for messages the library
/// writes itself (a projection's status, logs). Every error's `Display` shows only its own level,
/// and `source()` leads to the next, so nothing is printed twice.
pub(crate) struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

/// An append-only log of events, partitioned into streams. Object-safe: hold it as
/// `Arc<dyn EventStore>` to pick the backend at run time.
///
/// Most programs never call it directly: [`Repository`](crate::Repository) appends and loads, and
/// a [`ProjectionRunner`](crate::ProjectionRunner) reads the global log. Use it for tools,
/// migrations and integrations that work on raw events.
///
/// Every backend runs the conformance suite (`cqrs_core::conformance`, behind the `conformance`
/// feature), so the rules stated here hold for all of them.
///
/// ```
/// use cqrs_core::{
///     EventId, EventStore, EventTypes, ExpectedVersion, InMemoryStore, NewEvent, Position,
///     StoreError, StreamId, StreamVersion,
/// };
///
/// fn opened(owner: &str) -> NewEvent {
///     NewEvent {
///         event_id: EventId::new(),
///         event_type: "Opened".into(),
///         schema_version: 1,
///         payload: serde_json::json!({ "owner": owner }),
///         metadata: Default::default(),
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), StoreError> {
/// let store = InMemoryStore::new();
/// let account = StreamId::new("account", "acc-42");
///
/// // Optimistic concurrency: the append states what it expects the stream to be.
/// let first = opened("ada");
/// let written = store.append(&account, ExpectedVersion::NoStream, vec![first.clone()]).await?;
/// assert_eq!(written.stream_version, StreamVersion::new(1));
///
/// // Re-sending the same batch (same event ids) is an idempotent retry: the original result.
/// let again = store.append(&account, ExpectedVersion::NoStream, vec![first]).await?;
/// assert_eq!(again, written);
///
/// // A stale expectation writes nothing.
/// let stale = store.append(&account, ExpectedVersion::NoStream, vec![opened("bob")]).await;
/// assert!(matches!(stale, Err(StoreError::Concurrency(_))));
///
/// // The global log, gap-free, from the start.
/// let log = store.read_all(Position::START, EventTypes::All, 100).await?;
/// assert_eq!(log.len(), 1);
/// assert_eq!(log[0].position, written.position);
/// # Ok(()) }
/// ```
#[async_trait]
pub trait EventStore: Send + Sync + 'static {
    /// Appends `events` to `stream` atomically if it satisfies `expected`; all or nothing.
    ///
    /// Idempotency (the KurrentDB semantics): if every event id of the batch is already stored, as
    /// this very batch (same stream, consecutive versions, same order), the append is a retry of an
    /// earlier successful one: nothing is written and the original [`AppendResult`] is returned,
    /// whatever `expected` says now. If only some ids are stored, or they are stored elsewhere, the
    /// append fails with [`StoreError::IdempotencyConflict`].
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError>;

    /// Reads up to `limit` events of `stream` with version `>= from`, in version order.
    async fn read_stream(
        &self,
        stream: &StreamId,
        from: StreamVersion,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// Reads up to `limit` events of `stream` with version `>= from`, in version order, as an
    /// aggregate's replay needs them: the same events as [`EventStore::read_stream`], without
    /// their metadata, stream id and position. The default reads [`EventStore::read_stream`] and drops
    /// those; a backend overrides it to read fewer columns (loading a long stream is the cost of
    /// a command whose aggregate is not cached).
    async fn read_stream_for_replay(
        &self,
        stream: &StreamId,
        from: StreamVersion,
        limit: usize,
    ) -> Result<Vec<ReplayEvent>, StoreError> {
        let events = self.read_stream(stream, from, limit).await?;
        Ok(events.into_iter().map(ReplayEvent::from).collect())
    }

    /// Reads up to `limit` events of the global log strictly after `after`, in log order, filtered by
    /// type. Gap-free: an event is never returned after an event that follows it in log order, so a
    /// reader that resumes from the last position it saw never skips one.
    async fn read_all(
        &self,
        after: Position,
        types: EventTypes<'_>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError>;

    /// The stored event with id `id`, if any (one lookup by the unique event-id index): what an
    /// idempotent command checks before deciding again.
    async fn find_event(&self, id: EventId) -> Result<Option<RecordedEvent>, StoreError>;

    /// The current version of `stream` ([`StreamVersion::INITIAL`] if it has no events).
    async fn stream_version(&self, stream: &StreamId) -> Result<StreamVersion, StoreError>;

    /// The position of the last event `read_all` can currently return, if any.
    async fn head(&self) -> Result<Option<Position>, StoreError>;

    /// The position of the last event committed before this call, whether or not `read_all` can
    /// return it yet (on PostgreSQL an event stays unreadable while an older transaction runs:
    /// see [`EventStore::read_all`]'s gap-free rule). A reader that must see everything committed
    /// before it started reads up to here, after [`EventStore::wait_until_readable`]. The default
    /// is [`EventStore::head`], right for backends where every committed event is readable.
    async fn committed_head(&self) -> Result<Option<Position>, StoreError> {
        self.head().await
    }

    /// Waits until `read_all` can return every event up to `position` (a position from
    /// [`EventStore::committed_head`]), or fails with [`StoreError::NotYetReadable`] naming what
    /// holds readers back once the backend's bounded wait runs out. The default returns at once,
    /// right for backends where every committed event is readable.
    async fn wait_until_readable(&self, position: Position) -> Result<(), StoreError> {
        let _ = position;
        Ok(())
    }

    /// How many events `read_all` would return after `after` with this filter (for lag and progress).
    async fn count_after(&self, after: Position, types: EventTypes<'_>) -> Result<u64, StoreError>;

    /// How many events `read_all` returns after `after` up to and including `until` (a position
    /// at or before [`EventStore::head`]), with this filter: the exact size of a catch-up while
    /// writers keep appending. The default subtracts two [`EventStore::count_after`] calls, which
    /// is exact only when nothing is appended meanwhile; backends override it.
    async fn count_between(
        &self,
        after: Position,
        until: Position,
        types: EventTypes<'_>,
    ) -> Result<u64, StoreError> {
        let to_head = self.count_after(after, types).await?;
        let beyond = self.count_after(until, types).await?;
        Ok(to_head.saturating_sub(beyond))
    }

    /// Resolves when events may have been appended after `after`, or after `timeout` at the latest.
    /// Subscriptions use it to follow live appends. Backends with a notification mechanism override
    /// it; the default waits a short polling interval.
    async fn wait_for_append(&self, after: Position, timeout: std::time::Duration) {
        let _ = after;
        tokio::time::sleep(timeout.min(std::time::Duration::from_millis(50))).await;
    }
}

/// Reads a stream from `from` as an async stream of events, `batch` at a time: memory stays bounded
/// by one batch however long the stream is.
pub fn read_stream_batched<'a>(
    store: &'a dyn EventStore,
    stream: &'a StreamId,
    from: StreamVersion,
    batch: usize,
) -> impl Stream<Item = Result<RecordedEvent, StoreError>> + Send + 'a {
    paginate(
        from,
        batch,
        move |next, limit| store.read_stream(stream, next, limit),
        |e| e.stream_version.next(),
    )
}

/// Reads a stream from `from` for an aggregate's replay
/// ([`EventStore::read_stream_for_replay`]), `batch` at a time: memory stays bounded by one batch.
pub fn replay_stream_batched<'a>(
    store: &'a dyn EventStore,
    stream: &'a StreamId,
    from: StreamVersion,
    batch: usize,
) -> impl Stream<Item = Result<ReplayEvent, StoreError>> + Send + 'a {
    paginate(
        from,
        batch,
        move |next, limit| store.read_stream_for_replay(stream, next, limit),
        |e| e.stream_version.next(),
    )
}

/// Reads the global log after `after` as an async stream of events, `batch` at a time, until a
/// batch comes back short (the head at that moment).
pub fn read_all_batched<'a>(
    store: &'a dyn EventStore,
    after: Position,
    types: EventTypes<'a>,
    batch: usize,
) -> impl Stream<Item = Result<RecordedEvent, StoreError>> + Send + 'a {
    paginate(
        after,
        batch,
        move |cursor, limit| store.read_all(cursor, types, limit),
        |e| e.position,
    )
}

/// Keyset pagination: fetch a page from `cursor`, yield its events one by one, move the cursor past
/// the last one, stop after a short page.
fn paginate<'a, T, C, F, Fut>(
    start: C,
    batch: usize,
    fetch: F,
    cursor_after: fn(&T) -> C,
) -> impl Stream<Item = Result<T, StoreError>> + Send + 'a
where
    T: Send + 'a,
    C: Copy + Send + 'a,
    F: Fn(C, usize) -> Fut + Send + 'a,
    Fut: std::future::Future<Output = Result<Vec<T>, StoreError>> + Send + 'a,
{
    let batch = batch.max(1);
    let state = (VecDeque::<T>::new(), start, false);
    stream::try_unfold(state, move |(mut buffer, cursor, exhausted)| {
        let page = (buffer.is_empty() && !exhausted).then(|| fetch(cursor, batch));
        async move {
            let (mut cursor, mut exhausted) = (cursor, exhausted);
            if let Some(page) = page {
                let page = page.await?;
                exhausted = page.len() < batch;
                if let Some(last) = page.last() {
                    cursor = cursor_after(last);
                }
                buffer.extend(page);
            }
            Ok(buffer
                .pop_front()
                .map(|event| (event, (buffer, cursor, exhausted))))
        }
    })
}
