//! The repository re-sends a batch whose append reply was lost, with the same event ids.

// Tests: failing assertions panic by design.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::sync::{Arc, Mutex};

use cqrs_core::conformance::{Add, Counter};
use cqrs_core::{
    AppendResult, EventId, EventStore, EventTypes, ExecuteError, ExpectedVersion, InMemoryStore,
    NewEvent, Position, RecordedEvent, Repository, StoreError, StreamId, StreamVersion,
};

/// Loses the reply of the first `lose` appends; writes the first of them all the same when
/// `first_lands` (the connection dropped after the commit).
#[derive(Clone)]
struct LosingStore {
    inner: InMemoryStore,
    lose: usize,
    first_lands: bool,
    /// The event ids of every append call, in call order.
    sent: Arc<Mutex<Vec<Vec<EventId>>>>,
}

impl LosingStore {
    fn new(lose: usize, first_lands: bool) -> Self {
        Self {
            inner: InMemoryStore::new(),
            lose,
            first_lands,
            sent: Arc::default(),
        }
    }
}

#[async_trait::async_trait]
impl EventStore for LosingStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let call = {
            let mut sent = self.sent.lock().unwrap();
            sent.push(events.iter().map(|e| e.event_id).collect());
            sent.len()
        };
        if call > self.lose {
            return self.inner.append(stream, expected, events).await;
        }
        if call == 1 && self.first_lands {
            self.inner.append(stream, expected, events).await?;
        }
        Err(StoreError::OutcomeUnknown("reply lost".into()))
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
        self.inner.read_all(after, types, limit).await
    }
    async fn find_event(
        &self,
        id: cqrs_core::EventId,
    ) -> Result<Option<cqrs_core::RecordedEvent>, StoreError> {
        self.inner.find_event(id).await
    }
    async fn stream_version(&self, stream: &StreamId) -> Result<StreamVersion, StoreError> {
        self.inner.stream_version(stream).await
    }
    async fn head(&self) -> Result<Option<Position>, StoreError> {
        self.inner.head().await
    }
    async fn count_after(&self, after: Position, types: EventTypes<'_>) -> Result<u64, StoreError> {
        self.inner.count_after(after, types).await
    }
}

#[tokio::test]
async fn a_command_whose_stored_append_lost_its_reply_succeeds_once() {
    let store = LosingStore::new(1, true);
    let repo = Repository::<Counter>::new(store.clone());
    let outcome = repo.execute("c", &Add(5)).await.unwrap();
    assert_eq!(outcome.stream_version, StreamVersion::new(1));
    assert_eq!(outcome.attempts, 1, "not decided again");
    let stream = StreamId::new("counter", "c");
    assert_eq!(
        store.inner.stream_version(&stream).await.unwrap(),
        StreamVersion::new(1),
        "stored once"
    );
    let sent = store.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[0], sent[1], "the re-send carries the same event ids");
}

#[tokio::test]
async fn a_command_whose_lost_append_was_not_stored_is_written_by_the_re_send() {
    let store = LosingStore::new(2, false);
    let repo = Repository::<Counter>::new(store.clone());
    let outcome = repo.execute("c", &Add(5)).await.unwrap();
    assert_eq!(outcome.stream_version, StreamVersion::new(1));
    let sent = store.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 3);
    assert!(sent.iter().all(|ids| *ids == sent[0]));
}

#[tokio::test]
async fn an_outcome_that_stays_unknown_is_reported_as_such() {
    let store = LosingStore::new(usize::MAX, false);
    let repo = Repository::<Counter>::new(store.clone());
    let error = repo.execute("c", &Add(5)).await.unwrap_err();
    assert!(
        matches!(error, ExecuteError::Store(StoreError::OutcomeUnknown(_))),
        "{error:?}"
    );
    assert!(!StoreError::OutcomeUnknown("lost".into()).is_transient());
    let sent = store.sent.lock().unwrap().clone();
    assert!(
        sent.len() > 1 && sent.len() <= 8,
        "a few re-sends: {}",
        sent.len()
    );
    assert!(sent.iter().all(|ids| *ids == sent[0]));
}
