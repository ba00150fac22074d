//! The test suite every storage backend runs, so that all backends mean the same thing.
//!
//! A backend's test crate calls [`crate::backend_conformance_tests!`] with an async factory returning a
//! fresh, empty, isolated store (its own schema or database):
//!
//! ```ignore
//! async fn fresh_store() -> MyStore { /* ... */ }
//! cqrs_core::backend_conformance_tests!(fresh_store);
//! ```
//!
//! Each case is also a public async function here, to call directly. They panic on failure, like tests.

// A test suite: failing assertions panic by design.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod admin;
pub mod projections;

pub use admin::{
    admin_lists_checkpoints_skips_leases_and_horizon, admin_lists_stream_types_and_pages_streams,
};

use std::collections::{HashMap, HashSet};

use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::aggregate::{Aggregate, Handle};
use crate::checkpoint::CheckpointStore;
use crate::command::{Repository, RetryPolicy};
use crate::event::{
    EncodeError, Event, EventId, EventSet, Metadata, NewEvent, RecordedEvent, ReplayEvent,
};
use crate::json::RawJson;
use crate::snapshot::{Snapshot, SnapshotPolicy, SnapshotStore};
use crate::store::{read_all_batched, EventStore, EventTypes, StoreError};
use crate::stream::{ExpectedVersion, Position, StreamId, StreamVersion};
use crate::upcast::DecodeError;

/// Everything a full backend implements.
pub trait Backend: EventStore + SnapshotStore + CheckpointStore + Clone {}
impl<T: EventStore + SnapshotStore + CheckpointStore + Clone> Backend for T {}

/// Generates one `#[tokio::test]` per conformance case, each with a fresh store from `$factory`
/// (an `async fn() -> impl Backend`). The calling crate needs `tokio` with `macros` and
/// `rt-multi-thread`. Cases of one backend run in parallel, each on its own store: a backend's
/// stores must be isolated (their own schema, file or key prefix).
#[macro_export]
macro_rules! backend_conformance_tests {
    ($factory:path) => {
        $crate::backend_conformance_tests!(@cases $factory;
            append_and_read_round_trip,
            expected_version_cases,
            concurrent_appends_lose_and_duplicate_nothing,
            idempotent_append,
            invalid_input_is_rejected,
            invalid_names_are_rejected_on_read_paths,
            payloads_every_backend_reads_back,
            idempotent_commands_apply_once,
            hostile_ids_round_trip,
            read_all_order_filter_and_paging,
            snapshots_latest_wins,
            stale_and_broken_snapshots_replay,
            temporal_loads,
            checkpoints_compare_and_set,
        );
    };
    (@cases $factory:path; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                $crate::conformance::$case($factory().await).await;
            }
        )*
    };
}

fn event(event_type: &str, payload: Value) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: event_type.to_owned(),
        schema_version: 1,
        payload,
        metadata: Metadata::default(),
    }
}

fn numbered(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| event("Numbered", json!({ "i": i })))
        .collect()
}

async fn read_everything(store: &impl EventStore, types: EventTypes<'_>) -> Vec<RecordedEvent> {
    read_all_batched(store, Position::START, types, 97)
        .try_collect()
        .await
        .expect("read_all")
}

fn conflict(result: Result<impl std::fmt::Debug, StoreError>) -> (ExpectedVersion, StreamVersion) {
    match result {
        Err(StoreError::Concurrency(c)) => (c.expected, c.actual),
        other => panic!("expected a concurrency error, got {other:?}"),
    }
}

/// `read_stream_for_replay` returns exactly what `read_stream` returns, less the metadata and
/// the stream id. Returns how many events it read.
async fn replay_matches(
    store: &impl Backend,
    stream: &StreamId,
    from: StreamVersion,
    limit: usize,
) -> usize {
    let full = store
        .read_stream(stream, from, limit)
        .await
        .expect("read_stream");
    let replay = store
        .read_stream_for_replay(stream, from, limit)
        .await
        .expect("read_stream_for_replay");
    let expected: Vec<ReplayEvent> = full.into_iter().map(ReplayEvent::from).collect();
    assert_eq!(
        replay, expected,
        "read_stream_for_replay({stream}, {from:?}, {limit}) differs from read_stream"
    );
    replay.len()
}

/// Appended events read back with every envelope field intact.
pub async fn append_and_read_round_trip(store: impl Backend) {
    let stream = StreamId::new("order", "o-1");
    let correlation = uuid::Uuid::now_v7();
    let mut batch = vec![
        event(
            "OrderCreated",
            json!({ "customer": "c-1", "nested": { "a": [1, 2, 3] } }),
        ),
        event("ItemAdded", json!({ "sku": "x", "qty": 2, "price": 1.5 })),
        event("OrderSubmitted", json!({})),
    ];
    batch[1].schema_version = 3;
    for e in &mut batch {
        e.metadata.correlation_id = Some(correlation);
        e.metadata.causation_id = Some(*e.event_id.as_uuid());
        e.metadata.custom.insert("user".into(), json!("ada"));
    }
    let before = chrono::Utc::now() - chrono::Duration::seconds(5);
    let result = store
        .append(&stream, ExpectedVersion::NoStream, batch.clone())
        .await
        .expect("append");
    assert_eq!(result.stream_version, StreamVersion::new(3));
    assert_eq!(
        store.stream_version(&stream).await.expect("version"),
        StreamVersion::new(3)
    );

    let read = store
        .read_stream(&stream, StreamVersion::new(1), 100)
        .await
        .expect("read");
    assert_eq!(read.len(), 3);
    for (i, (sent, got)) in batch.iter().zip(&read).enumerate() {
        assert_eq!(got.event_id, sent.event_id);
        assert_eq!(got.stream, stream);
        assert_eq!(got.stream_version, StreamVersion::new(i as u64 + 1));
        assert_eq!(got.event_type, sent.event_type);
        assert_eq!(got.schema_version, sent.schema_version);
        assert_eq!(got.payload.to_value().expect("payload"), sent.payload);
        assert_eq!(got.metadata().expect("metadata"), sent.metadata);
        assert!(
            got.recorded_at > before,
            "recorded_at {} is not recent",
            got.recorded_at
        );
    }
    assert!(read.windows(2).all(|w| w[0].position < w[1].position));
    assert_eq!(
        read[2].position, result.position,
        "append returns the last event's position"
    );

    let middle = store
        .read_stream(&stream, StreamVersion::new(2), 1)
        .await
        .expect("read");
    assert_eq!(middle.len(), 1);
    assert_eq!(middle[0].stream_version, StreamVersion::new(2));
    let past_end = store
        .read_stream(&stream, StreamVersion::new(4), 10)
        .await
        .expect("read");
    assert!(past_end.is_empty());
    for (from, limit, count) in [(1, 100, 3), (2, 1, 1), (3, 5, 1), (4, 10, 0)] {
        let read = replay_matches(&store, &stream, StreamVersion::new(from), limit).await;
        assert_eq!(read, count, "replay read from {from}, limit {limit}");
    }
    let missing = StreamId::new("order", "none");
    assert_eq!(
        replay_matches(&store, &missing, StreamVersion::new(1), 10).await,
        0
    );
    assert!(store
        .read_stream(&missing, StreamVersion::new(1), 10)
        .await
        .expect("read")
        .is_empty());
    assert_eq!(
        store.stream_version(&missing).await.expect("version"),
        StreamVersion::INITIAL
    );
    let other_type = StreamId::new("invoice", "o-1");
    assert_eq!(
        store.stream_version(&other_type).await.expect("version"),
        StreamVersion::INITIAL
    );
}

/// `Any`, `NoStream`, `StreamExists` and `Exact` accept and reject exactly; a rejected append writes
/// nothing.
pub async fn expected_version_cases(store: impl Backend) {
    let s = StreamId::new("account", "a-1");
    let v = StreamVersion::new;
    conflict_free(
        store
            .append(&s, ExpectedVersion::StreamExists, numbered(1))
            .await,
        (ExpectedVersion::StreamExists, v(0)),
    );
    store
        .append(&s, ExpectedVersion::NoStream, numbered(2))
        .await
        .expect("NoStream on empty");
    conflict_free(
        store
            .append(&s, ExpectedVersion::NoStream, numbered(1))
            .await,
        (ExpectedVersion::NoStream, v(2)),
    );
    conflict_free(
        store
            .append(&s, ExpectedVersion::Exact(v(1)), numbered(1))
            .await,
        (ExpectedVersion::Exact(v(1)), v(2)),
    );
    conflict_free(
        store
            .append(&s, ExpectedVersion::Exact(v(0)), numbered(1))
            .await,
        (ExpectedVersion::Exact(v(0)), v(2)),
    );
    let r = store
        .append(&s, ExpectedVersion::Exact(v(2)), numbered(2))
        .await
        .expect("Exact(2)");
    assert_eq!(r.stream_version, v(4));
    conflict_free(
        store
            .append(&s, ExpectedVersion::Exact(v(3)), numbered(3))
            .await,
        (ExpectedVersion::Exact(v(3)), v(4)),
    );
    let r = store
        .append(&s, ExpectedVersion::StreamExists, numbered(1))
        .await
        .expect("StreamExists");
    assert_eq!(r.stream_version, v(5));
    let r = store
        .append(&s, ExpectedVersion::Any, numbered(1))
        .await
        .expect("Any");
    assert_eq!(r.stream_version, v(6));
    let fresh = StreamId::new("account", "a-2");
    let r = store
        .append(&fresh, ExpectedVersion::Any, numbered(1))
        .await
        .expect("Any on empty");
    assert_eq!(r.stream_version, v(1));
    let fresh = StreamId::new("account", "a-3");
    let r = store
        .append(&fresh, ExpectedVersion::Exact(v(0)), numbered(1))
        .await
        .expect("Exact(0)");
    assert_eq!(r.stream_version, v(1));
    assert_eq!(
        store.stream_version(&s).await.expect("version"),
        v(6),
        "rejected appends wrote nothing"
    );
    let versions: Vec<u64> = store
        .read_stream(&s, v(1), 100)
        .await
        .expect("read")
        .iter()
        .map(|e| e.stream_version.get())
        .collect();
    assert_eq!(versions, vec![1, 2, 3, 4, 5, 6]);

    fn conflict_free(
        result: Result<crate::AppendResult, StoreError>,
        expected: (ExpectedVersion, StreamVersion),
    ) {
        assert_eq!(conflict(result), expected);
    }
}

/// 10 tasks × 100 appends × 10 events, five racing on one stream with `Exact` + retry and five on
/// their own streams: nothing lost, nothing duplicated, versions dense, positions unique.
pub async fn concurrent_appends_lose_and_duplicate_nothing(store: impl Backend) {
    const TASKS: usize = 10;
    const APPENDS: usize = 100;
    const EVENTS: usize = 10;
    let shared = StreamId::new("ledger", "shared");
    let mut handles = Vec::new();
    for task in 0..TASKS {
        let store = store.clone();
        let stream = if task < TASKS / 2 {
            shared.clone()
        } else {
            StreamId::new("ledger", format!("own-{task}"))
        };
        handles.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for _ in 0..APPENDS {
                let batch = numbered(EVENTS);
                loop {
                    let current = store.stream_version(&stream).await.expect("version");
                    match store
                        .append(&stream, ExpectedVersion::Exact(current), batch.clone())
                        .await
                    {
                        Ok(_) => break,
                        Err(StoreError::Concurrency(_)) => tokio::task::yield_now().await,
                        Err(other) => panic!("append failed: {other}"),
                    }
                }
                sent.extend(batch.into_iter().map(|e| e.event_id));
            }
            sent
        }));
    }
    let mut sent = HashSet::new();
    for handle in handles {
        for id in handle.await.expect("task") {
            assert!(sent.insert(id), "an id was sent twice");
        }
    }
    let all = read_everything(&store, EventTypes::All).await;
    assert_eq!(
        all.len(),
        TASKS * APPENDS * EVENTS,
        "lost or duplicated events"
    );
    let stored: HashSet<EventId> = all.iter().map(|e| e.event_id).collect();
    assert_eq!(stored, sent, "stored ids differ from sent ids");
    assert!(
        all.windows(2).all(|w| w[0].position < w[1].position),
        "positions not increasing"
    );
    let sequences: HashSet<u64> = all.iter().map(|e| e.position.sequence).collect();
    assert_eq!(sequences.len(), all.len(), "positions not unique");
    let mut per_stream: HashMap<&StreamId, Vec<u64>> = HashMap::new();
    for e in &all {
        per_stream
            .entry(&e.stream)
            .or_default()
            .push(e.stream_version.get());
    }
    for (stream, mut versions) in per_stream {
        versions.sort_unstable();
        let dense: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, dense, "versions of {stream} are not dense");
    }
    assert_eq!(
        store.stream_version(&shared).await.expect("version").get(),
        (TASKS / 2 * APPENDS * EVENTS) as u64
    );
}

/// Re-sending a stored batch returns the original result and writes nothing; anything else that
/// reuses stored ids is an `IdempotencyConflict` that writes nothing.
pub async fn idempotent_append(store: impl Backend) {
    let s = StreamId::new("payment", "p-1");
    let batch = numbered(3);
    let first = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .expect("append");
    let again = store
        .append(&s, ExpectedVersion::NoStream, batch.clone())
        .await
        .expect("retry");
    assert_eq!(again, first, "a retry returns the original result");
    let again = store
        .append(
            &s,
            ExpectedVersion::Exact(StreamVersion::new(3)),
            batch.clone(),
        )
        .await
        .expect("retry");
    assert_eq!(
        again, first,
        "a retry is recognized whatever it expects now"
    );
    store
        .append(&s, ExpectedVersion::Any, numbered(1))
        .await
        .expect("more");
    let again = store
        .append(&s, ExpectedVersion::Any, batch.clone())
        .await
        .expect("late retry");
    assert_eq!(again, first);

    let partial = vec![batch[2].clone(), event("Numbered", json!({}))];
    let other_stream = StreamId::new("payment", "p-2");
    let reordered = vec![batch[1].clone(), batch[0].clone(), batch[2].clone()];
    let subset = vec![batch[1].clone(), batch[2].clone()];
    for (what, stream, events) in [
        ("partial overlap", &s, partial),
        ("other stream", &other_stream, batch.clone()),
        ("reordered", &s, reordered),
    ] {
        match store.append(stream, ExpectedVersion::Any, events).await {
            Err(StoreError::IdempotencyConflict { .. }) => {}
            other => panic!("{what}: expected IdempotencyConflict, got {other:?}"),
        }
    }
    // A contiguous tail of a stored batch is itself a stored sequence: a retry of that sub-batch.
    let tail = store
        .append(&s, ExpectedVersion::Any, subset)
        .await
        .expect("sub-batch retry");
    assert_eq!(tail, first);
    assert_eq!(
        store.stream_version(&s).await.expect("version"),
        StreamVersion::new(4)
    );
    assert_eq!(
        store.stream_version(&other_stream).await.expect("version"),
        StreamVersion::INITIAL
    );
    assert_eq!(
        read_everything(&store, EventTypes::All).await.len(),
        4,
        "nothing extra written"
    );
}

/// Empty batches, ids twice in one batch and unstorable names are rejected, writing nothing.
pub async fn invalid_input_is_rejected(store: impl Backend) {
    let s = StreamId::new("account", "a");
    assert!(matches!(
        store.append(&s, ExpectedVersion::Any, vec![]).await,
        Err(StoreError::EmptyAppend { .. })
    ));
    let e = event("Numbered", json!({}));
    assert!(matches!(
        store
            .append(&s, ExpectedVersion::Any, vec![e.clone(), e])
            .await,
        Err(StoreError::DuplicateIdInBatch { .. })
    ));
    for bad in [
        StreamId::new("", "x"),
        StreamId::new("a", ""),
        StreamId::new("a", "nul\0byte"),
        StreamId::new("a", "x".repeat(crate::stream::MAX_STREAM_ID_LEN + 1)),
    ] {
        assert!(
            matches!(
                store.append(&bad, ExpectedVersion::Any, numbered(1)).await,
                Err(StoreError::InvalidId(_))
            ),
            "stream id {:?} accepted",
            bad.id().chars().take(20).collect::<String>()
        );
    }
    for bad_type in [
        "",
        "nul\0",
        &"t".repeat(crate::stream::MAX_EVENT_TYPE_LEN + 1),
    ] {
        assert!(matches!(
            store
                .append(&s, ExpectedVersion::Any, vec![event(bad_type, json!({}))])
                .await,
            Err(StoreError::InvalidId(_))
        ));
    }
    assert!(read_everything(&store, EventTypes::All).await.is_empty());
}

/// JSON is accepted only where every backend can store it and read it back as given: a NUL
/// character and nesting deeper than [`crate::event::MAX_JSON_DEPTH`] are
/// [`StoreError::InvalidPayload`] everywhere (in payloads, metadata and snapshots), and what is
/// accepted reads back equal, every finite float included.
pub async fn payloads_every_backend_reads_back(store: impl Backend) {
    fn nested(levels: usize) -> Value {
        (1..levels).fold(json!([]), |inner, _| json!([inner]))
    }
    let s = StreamId::new("account", "json");
    let with_metadata = |value: Value| {
        let mut e = event("Numbered", json!({}));
        e.metadata.custom.insert("k".into(), value);
        e
    };
    let refused = [
        (
            "NUL in a string",
            event("Numbered", json!({ "s": "a\u{0}b" })),
        ),
        ("NUL in a key", event("Numbered", json!({ "a\u{0}": 1 }))),
        ("NUL in metadata", with_metadata(json!(["\u{0}"]))),
        (
            "too deep",
            event("Numbered", nested(crate::event::MAX_JSON_DEPTH + 1)),
        ),
        (
            "too deep in metadata",
            with_metadata(nested(crate::event::MAX_JSON_DEPTH + 1)),
        ),
    ];
    for (what, e) in refused {
        let outcome = store.append(&s, ExpectedVersion::Any, vec![e]).await;
        assert!(
            matches!(outcome, Err(StoreError::InvalidPayload { .. })),
            "{what}: {outcome:?}"
        );
    }
    let snapshot = |payload: Value| Snapshot {
        stream: s.clone(),
        stream_version: StreamVersion::new(1),
        snapshot_version: 1,
        payload,
    };
    for payload in [json!("\u{0}"), nested(crate::event::MAX_JSON_DEPTH + 1)] {
        let outcome = store.save_snapshot(snapshot(payload)).await;
        assert!(
            matches!(outcome, Err(StoreError::InvalidPayload { .. })),
            "{outcome:?}"
        );
    }
    assert!(read_everything(&store, EventTypes::All).await.is_empty());

    let accepted = json!({
        "deep": nested(crate::event::MAX_JSON_DEPTH - 1),
        "floats": [f64::MAX, f64::MIN, f64::MIN_POSITIVE, 1e300, -1.7e308, -2.5e-300, 5e-324, 1.5, 0.1, 1e15, 123_456_789.125],
        "ints": [u64::MAX, i64::MIN],
        "text": "\\u0000 is just text here",
    });
    store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![event("Numbered", accepted.clone())],
        )
        .await
        .expect("a payload within the limits");
    let read = read_everything(&store, EventTypes::All).await;
    assert_eq!(read[0].payload.to_value().expect("payload"), accepted);
}

/// A command executed with a command id that was already applied appends nothing and returns the
/// original outcome: executed again, from another repository (as another process would), and by
/// several tasks at once. A reaction to one event by one reaction name is one command.
pub async fn idempotent_commands_apply_once(store: impl Backend) {
    use crate::command::CommandContext;
    let context = CommandContext::new().with_command_id(uuid::Uuid::now_v7());
    let repo = Repository::<Counter>::new(store.clone());
    let first = repo.execute_in("once", &Add(5), &context).await.unwrap();
    assert!(!first.replayed);
    for again in [
        repo.execute_in("once", &Add(5), &context).await.unwrap(),
        Repository::<Counter>::new(store.clone())
            .execute_in("once", &Add(5), &context)
            .await
            .unwrap(),
    ] {
        assert!(again.replayed, "{again:?}");
        assert_eq!(
            (&again.events, again.stream_version, again.position),
            (&first.events, first.stream_version, first.position)
        );
    }
    assert_eq!(repo.load("once").await.unwrap().state.total, 5);
    let elsewhere = repo.execute_in("elsewhere", &Add(5), &context).await;
    assert!(
        matches!(
            elsewhere,
            Err(crate::command::ExecuteError::Store(
                StoreError::IdempotencyConflict { .. }
            ))
        ),
        "one command id on two aggregates: {elsewhere:?}"
    );

    let context = CommandContext::new().with_command_id(uuid::Uuid::now_v7());
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let repo = Repository::<Counter>::new(store.clone());
            let context = context.clone();
            tokio::spawn(async move { repo.execute_in("racing", &Add(1), &context).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    let raced = repo.load("racing").await.unwrap();
    assert_eq!(
        (raced.state.total, raced.version),
        (1, StreamVersion::new(1)),
        "eight concurrent executions of one command apply it once"
    );

    let cause = store
        .read_stream(&StreamId::new("counter", "once"), StreamVersion::new(1), 1)
        .await
        .unwrap()
        .remove(0);
    let caused_by = |reaction| CommandContext::caused_by(&cause, reaction).expect("metadata");
    let reaction = caused_by("audit");
    assert!(reaction.is_idempotent());
    assert_eq!(reaction.command_id, caused_by("audit").command_id);
    assert_ne!(reaction.command_id, caused_by("billing").command_id);
}

/// The same names are rejected on every read path, with [`StoreError::InvalidId`], never a raw
/// backend error or an empty answer: stream ids (reads, versions, snapshots, a command's load),
/// event-type filters, and checkpoint names.
pub async fn invalid_names_are_rejected_on_read_paths(store: impl Backend) {
    fn invalid<T: std::fmt::Debug>(what: &str, result: Result<T, StoreError>) {
        assert!(
            matches!(result, Err(StoreError::InvalidId(_))),
            "{what}: {result:?}"
        );
    }
    let long_id = "x".repeat(crate::stream::MAX_STREAM_ID_LEN + 1);
    for bad in [StreamId::new("a", "nul\0byte"), StreamId::new("a", long_id)] {
        invalid(
            "read_stream",
            store.read_stream(&bad, StreamVersion::new(1), 10).await,
        );
        invalid(
            "read_stream_for_replay",
            store
                .read_stream_for_replay(&bad, StreamVersion::new(1), 10)
                .await,
        );
        invalid("stream_version", store.stream_version(&bad).await);
        invalid("load_snapshot", store.load_snapshot(&bad).await);
    }
    let loaded = Repository::<Counter>::new(store.clone())
        .execute("nul\0byte", &Add(1))
        .await;
    assert!(
        matches!(
            loaded,
            Err(crate::command::ExecuteError::Store(StoreError::InvalidId(
                _
            )))
        ),
        "a command for an invalid id: {loaded:?}"
    );
    let long_type = "t".repeat(crate::stream::MAX_EVENT_TYPE_LEN + 1);
    for bad in [
        &["Added", "nul\0"][..],
        &["", "Added"][..],
        &[long_type.as_str()][..],
    ] {
        let types = EventTypes::Only(bad);
        invalid("read_all", store.read_all(Position::START, types, 10).await);
        invalid(
            "count_after",
            store.count_after(Position::START, types).await,
        );
        invalid(
            "count_between",
            store
                .count_between(Position::START, Position::new(1, 1), types)
                .await,
        );
    }
    let long_name = "c".repeat(crate::checkpoint::MAX_CHECKPOINT_NAME_LEN + 1);
    for bad in ["", "nul\0", long_name.as_str()] {
        invalid("load_checkpoint", store.load_checkpoint(bad).await);
        invalid(
            "save_checkpoint",
            store.save_checkpoint(bad, None, Position::new(1, 1)).await,
        );
        invalid("delete_checkpoint", store.delete_checkpoint(bad).await);
    }
}

/// Quotes, semicolons, backslashes, unicode and long strings are stored and read back verbatim.
pub async fn hostile_ids_round_trip(store: impl Backend) {
    let ids = [
        "o'brien\"; DROP TABLE events; --".to_owned(),
        "back\\slash %_ wildcard $1 ?".to_owned(),
        "ünïcødé 🦀 日本語 \u{202e}rtl".to_owned(),
        "x".repeat(crate::stream::MAX_STREAM_ID_LEN),
        " leading and trailing ".to_owned(),
    ];
    for (i, id) in ids.iter().enumerate() {
        let stream = StreamId::new("it's; a type", id.clone());
        let mut batch = numbered(1);
        batch[0].event_type = format!("Ev'ent;\"{i}\" 🦀");
        batch[0].payload = json!({ "text": id, "sql": "'); DELETE FROM events; --" });
        batch[0].metadata.custom.insert("k'ey".into(), json!(id));
        store
            .append(&stream, ExpectedVersion::NoStream, batch.clone())
            .await
            .expect("append");
        let read = store
            .read_stream(&stream, StreamVersion::new(1), 10)
            .await
            .expect("read");
        assert_eq!(read.len(), 1);
        assert_eq!(read[0].stream, stream);
        assert_eq!(read[0].event_type, batch[0].event_type);
        assert_eq!(
            read[0].payload.to_value().expect("payload"),
            batch[0].payload
        );
        assert_eq!(read[0].metadata().expect("metadata"), batch[0].metadata);
        assert_eq!(
            replay_matches(&store, &stream, StreamVersion::new(1), 10).await,
            1
        );
        let types = [batch[0].event_type.as_str()];
        let filtered = read_everything(&store, EventTypes::Only(&types)).await;
        assert_eq!(filtered.len(), 1);
    }
}

/// `read_all` returns every event in log order, honours the type filter and pages exactly.
pub async fn read_all_order_and_filter_and_paging_impl(store: &impl Backend) {
    let mut appended = Vec::new();
    for i in 0..30 {
        let stream = StreamId::new("mixed", format!("s-{}", i % 4));
        let kind = if i % 3 == 0 { "Fizz" } else { "Other" };
        let e = event(kind, json!({ "i": i }));
        appended.push((e.event_id, kind));
        store
            .append(&stream, ExpectedVersion::Any, vec![e])
            .await
            .expect("append");
    }
    let all = read_everything(store, EventTypes::All).await;
    let ids: Vec<EventId> = all.iter().map(|e| e.event_id).collect();
    let expected: Vec<EventId> = appended.iter().map(|(id, _)| *id).collect();
    assert_eq!(
        ids, expected,
        "sequential appends read back in append order"
    );

    let fizz = read_everything(store, EventTypes::Only(&["Fizz"])).await;
    assert_eq!(fizz.len(), 10);
    assert!(fizz.iter().all(|e| e.event_type == "Fizz"));
    let none = read_everything(store, EventTypes::Only(&["Unknown"])).await;
    assert!(none.is_empty());
    let both = read_everything(store, EventTypes::Only(&["Fizz", "Other"])).await;
    assert_eq!(both.len(), 30);

    let page = store
        .read_all(all[4].position, EventTypes::All, 5)
        .await
        .expect("page");
    let page_ids: Vec<EventId> = page.iter().map(|e| e.event_id).collect();
    assert_eq!(
        page_ids,
        ids[5..10].to_vec(),
        "read_all is strictly after the given position"
    );
    assert_eq!(store.head().await.expect("head"), Some(all[29].position));
    assert_eq!(
        store
            .count_after(Position::START, EventTypes::All)
            .await
            .expect("count"),
        30
    );
    assert_eq!(
        store
            .count_after(all[9].position, EventTypes::All)
            .await
            .expect("count"),
        20
    );
    assert_eq!(
        store
            .count_after(all[9].position, EventTypes::Only(&["Fizz"]))
            .await
            .expect("count"),
        6
    );
    assert_eq!(
        store
            .count_between(all[9].position, all[19].position, EventTypes::All)
            .await
            .expect("count"),
        10
    );
    assert_eq!(
        store
            .count_between(
                Position::START,
                all[19].position,
                EventTypes::Only(&["Fizz"])
            )
            .await
            .expect("count"),
        all[..20].iter().filter(|e| e.event_type == "Fizz").count() as u64
    );
    let tail = store
        .read_all(all[29].position, EventTypes::All, 10)
        .await
        .expect("tail");
    assert!(tail.is_empty());
}

/// See [`read_all_order_and_filter_and_paging_impl`].
pub async fn read_all_order_filter_and_paging(store: impl Backend) {
    assert_eq!(
        store.head().await.expect("head"),
        None,
        "an empty store has no head"
    );
    read_all_order_and_filter_and_paging_impl(&store).await;
}

/// The latest snapshot wins; an older one never replaces a newer one.
pub async fn snapshots_latest_wins(store: impl Backend) {
    let s = StreamId::new("counter", "c-1");
    assert_eq!(store.load_snapshot(&s).await.expect("load"), None);
    let snap = |v: u64| Snapshot {
        stream: s.clone(),
        stream_version: StreamVersion::new(v),
        snapshot_version: 2,
        payload: json!({ "total": v }),
    };
    store.save_snapshot(snap(5)).await.expect("save");
    assert_eq!(store.load_snapshot(&s).await.expect("load"), Some(snap(5)));
    store.save_snapshot(snap(9)).await.expect("save");
    store.save_snapshot(snap(7)).await.expect("save older");
    assert_eq!(store.load_snapshot(&s).await.expect("load"), Some(snap(9)));
    let other = StreamId::new("counter", "c-2");
    assert_eq!(store.load_snapshot(&other).await.expect("load"), None);
}

/// A snapshot of another schema version, or an undecodable one, is ignored: the state comes from
/// a full replay and equals the replay without snapshots.
pub async fn stale_and_broken_snapshots_replay(store: impl Backend) {
    let with = Repository::<Counter>::snapshotting(store.clone(), SnapshotPolicy::every(4));
    let without = Repository::<Counter>::new(store.clone());
    for n in 1..=10 {
        with.execute("c", &Add(n)).await.expect("execute");
    }
    let replayed = without.load("c").await.expect("load");
    assert_eq!(replayed.state.total, 55);
    assert_eq!(replayed.version, StreamVersion::new(10));
    let snap = store
        .load_snapshot(&StreamId::new(Counter::TYPE, "c"))
        .await
        .expect("load")
        .expect("a snapshot was taken");
    assert_eq!(snap.stream_version, StreamVersion::new(8));
    assert_eq!(with.load("c").await.expect("load"), replayed);

    for (snapshot_version, payload) in [
        (
            Counter::SNAPSHOT_VERSION + 1,
            json!({ "total": 999, "adds": 0 }),
        ),
        (Counter::SNAPSHOT_VERSION, json!("not a counter")),
    ] {
        store
            .save_snapshot(Snapshot {
                stream: StreamId::new(Counter::TYPE, "c"),
                stream_version: StreamVersion::new(10),
                snapshot_version,
                payload,
            })
            .await
            .expect("save");
        assert_eq!(
            with.load("c").await.expect("load"),
            replayed,
            "a bad snapshot changed the state"
        );
    }
}

/// Loading at a version or an instant folds exactly the events up to it.
pub async fn temporal_loads(store: impl Backend) {
    let repo = Repository::<Counter>::new(store.clone()).with_retry(RetryPolicy::retries(1));
    for n in 1..=5 {
        repo.execute("t", &Add(n)).await.expect("execute");
    }
    let at_3 = repo
        .load_at_version("t", StreamVersion::new(3))
        .await
        .expect("load");
    assert_eq!((at_3.state.total, at_3.version), (6, StreamVersion::new(3)));
    let at_0 = repo
        .load_at_version("t", StreamVersion::INITIAL)
        .await
        .expect("load");
    assert_eq!(
        (at_0.state.total, at_0.version),
        (0, StreamVersion::INITIAL)
    );
    let beyond = repo
        .load_at_version("t", StreamVersion::new(50))
        .await
        .expect("load");
    assert_eq!(beyond.state.total, 15);
    let events = store
        .read_stream(
            &StreamId::new(Counter::TYPE, "t"),
            StreamVersion::new(1),
            10,
        )
        .await
        .expect("read");
    let as_of = repo
        .load_as_of("t", events[1].recorded_at)
        .await
        .expect("load");
    assert!(
        as_of.version >= StreamVersion::new(2),
        "events at the instant are included"
    );
    let before = repo
        .load_as_of("t", events[0].recorded_at - chrono::Duration::seconds(1))
        .await
        .expect("load");
    assert_eq!(before.version, StreamVersion::INITIAL);
}

/// Checkpoints move only from the position the caller read.
pub async fn checkpoints_compare_and_set(store: impl Backend) {
    let name = "balances";
    let p1 = Position::new(10, 3);
    let p2 = Position::new(12, 8);
    assert_eq!(store.load_checkpoint(name).await.expect("load"), None);
    store
        .save_checkpoint(name, None, p1)
        .await
        .expect("first save");
    assert!(matches!(
        store.save_checkpoint(name, None, p2).await,
        Err(StoreError::CheckpointConflict { actual: Some(a), .. }) if a == p1
    ));
    assert!(matches!(
        store.save_checkpoint(name, Some(p2), p2).await,
        Err(StoreError::CheckpointConflict { .. })
    ));
    store
        .save_checkpoint(name, Some(p1), p2)
        .await
        .expect("advance");
    assert_eq!(store.load_checkpoint(name).await.expect("load"), Some(p2));
    assert_eq!(store.load_checkpoint("other").await.expect("load"), None);
    store.delete_checkpoint(name).await.expect("delete");
    assert_eq!(store.load_checkpoint(name).await.expect("load"), None);
    store
        .save_checkpoint(name, None, p1)
        .await
        .expect("save after reset");
}

/// A minimal aggregate for the repository-level cases, written by hand so core's suite does not
/// depend on the macros.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Counter {
    /// Sum of everything added.
    pub total: i64,
    /// Number of additions.
    pub adds: u64,
}

/// Adds `n` to a [`Counter`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Add(pub i64);

/// The event of [`Counter`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Added {
    /// The amount added.
    pub n: i64,
}

impl Event for Added {
    const NAME: &'static str = "Added";
    const VERSION: u32 = 1;
}

impl EventSet for Added {
    const NAMES: &'static [&'static str] = &["Added"];
    fn event_type(&self) -> &'static str {
        Self::NAME
    }
    fn schema_version(&self) -> u32 {
        Self::VERSION
    }
    fn encode(&self) -> Result<Value, EncodeError> {
        Event::encode(self)
    }
    fn decode(
        event_type: &str,
        schema_version: u32,
        payload: &RawJson,
    ) -> Result<Self, DecodeError> {
        if event_type != Self::NAME {
            return Err(DecodeError::UnknownEventType {
                event_type: event_type.to_owned(),
            });
        }
        <Self as Event>::decode(schema_version, payload)
    }
}

impl Aggregate for Counter {
    const TYPE: &'static str = "counter";
    type Event = Added;
    fn apply_event(&mut self, event: &Added) {
        self.total += event.n;
        self.adds += 1;
    }
}

/// Routed by the command bus to the counters' repository.
impl crate::aggregate::Command for Add {
    type Aggregate = Counter;
}

/// Rejection of a negative [`Add`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cannot add a negative amount ({0})")]
pub struct Negative(pub i64);

impl Handle<Add> for Counter {
    type Error = Negative;
    fn handle(&self, command: &Add) -> Result<Vec<Added>, Negative> {
        if command.0 < 0 {
            return Err(Negative(command.0));
        }
        Ok(vec![Added { n: command.0 }])
    }
}
