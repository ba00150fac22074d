//! Repository, bus, fixture and projection-runner behaviour on the in-memory backend.
// Tests: failing assertions panic by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cqrs_core::bus::{BusError, CommandBus, Receipt};
use cqrs_core::conformance::{Add, Added, Counter, Negative};
use cqrs_core::subscription::{
    InProcess, ProjectionRunner, ProjectionState, RunnerConfig, WaitError,
};
use cqrs_core::testing::AggregateFixture;
use cqrs_core::{
    CommandContext, EventStore, ExecuteError, ExpectedVersion, InMemoryStore, NewEvent, Position,
    Projection, ProjectionError, RecordedEvent, Repository, RetryPolicy, StreamId, StreamVersion,
};

#[tokio::test]
async fn execute_appends_with_causation_and_correlation() {
    let store = InMemoryStore::new();
    let repo = Repository::<Counter>::new(store.clone());
    let conversation = uuid::Uuid::now_v7();
    let ctx = CommandContext::new()
        .with_correlation_id(conversation)
        .with("user", "ada");
    let outcome = repo.execute_in("c", &Add(5), &ctx).await.unwrap();
    assert_eq!(outcome.stream_version, StreamVersion::new(1));
    assert_eq!(outcome.events, vec![Added { n: 5 }]);
    let stored = store
        .read_stream(&StreamId::new("counter", "c"), StreamVersion::new(1), 10)
        .await
        .unwrap();
    let metadata = stored[0].metadata().unwrap();
    assert_eq!(metadata.causation_id, Some(ctx.command_id));
    assert_eq!(metadata.correlation_id, Some(conversation));
    assert_eq!(metadata.custom["user"], "ada");
    assert_eq!(Some(stored[0].position), outcome.position);

    // A command caused by that event continues the conversation.
    let follow_up = CommandContext::caused_by(&stored[0], "follow_up").unwrap();
    assert_eq!(follow_up.correlation_id, Some(conversation));
    let next = repo.execute_in("c", &Add(1), &follow_up).await.unwrap();
    let reaction = store
        .read_stream(&StreamId::new("counter", "c"), next.stream_version, 1)
        .await
        .unwrap();
    let metadata = reaction[0].metadata().unwrap();
    assert_eq!(metadata.causation_id, Some(*stored[0].event_id.as_uuid()));
    assert_eq!(metadata.correlation_id, Some(conversation));
}

#[tokio::test]
async fn domain_errors_are_typed_and_write_nothing() {
    let store = InMemoryStore::new();
    let repo = Repository::<Counter>::new(store.clone());
    let err = repo.execute("c", &Add(-1)).await.unwrap_err();
    assert!(matches!(err, ExecuteError::Domain(Negative(-1))), "{err:?}");
    assert_eq!(store.head().await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commands_conflict_then_retry() {
    let store = InMemoryStore::new();
    let no_retry = Repository::<Counter>::new(store.clone());
    // Two deciders that loaded the same version: the second append must be rejected.
    let stream = StreamId::new("counter", "race");
    no_retry.execute("race", &Add(1)).await.unwrap();
    store
        .append(
            &stream,
            ExpectedVersion::Exact(StreamVersion::new(1)),
            vec![NewEvent::from_event(&Added { n: 1 }).unwrap()],
        )
        .await
        .unwrap();
    let err = store
        .append(
            &stream,
            ExpectedVersion::Exact(StreamVersion::new(1)),
            vec![NewEvent::from_event(&Added { n: 1 }).unwrap()],
        )
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("expected version 1, but it is at version 2"),
        "{err}"
    );

    // Many concurrent commands with retries: all land, none lost, and every conflict costs
    // exactly one more decision.
    let counting = CountingStore::over(store.clone());
    let retrying =
        Repository::<Counter>::new(counting.clone()).with_retry(RetryPolicy::retries(50));
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let repo = retrying.clone();
            tokio::spawn(async move { repo.execute("hot", &Add(1)).await })
        })
        .collect();
    let mut attempts = 0;
    for task in tasks {
        attempts += task.await.unwrap().unwrap().attempts;
    }
    let loaded = retrying.load("hot").await.unwrap();
    assert_eq!(loaded.state.total, 20);
    assert_eq!(loaded.version, StreamVersion::new(20));
    assert_eq!(attempts, 20 + counting.conflicts());

    // Without retries, of two commands that loaded the same version one lands and the other
    // gets ExecuteError::Concurrency (the loads meet at a gate, so they always overlap; without the
    // cache, so that both commands load).
    let duelling =
        Repository::<Counter>::new(CountingStore::gated(store.clone(), 2)).without_cache();
    for round in 1..=5u64 {
        let (a, b) = tokio::join!(
            duelling.execute("duel", &Add(1)),
            duelling.execute("duel", &Add(1))
        );
        let (landed, conflicted): (Vec<_>, Vec<_>) = [a, b].into_iter().partition(Result::is_ok);
        assert_eq!((landed.len(), conflicted.len()), (1, 1), "round {round}");
        match conflicted.into_iter().next() {
            Some(Err(ExecuteError::Concurrency(c))) => {
                assert_eq!(c.stream, StreamId::new("counter", "duel"));
                assert_eq!(c.actual, StreamVersion::new(round));
            }
            other => panic!("round {round}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn bus_routes_rejects_unknown_and_double_registration() {
    let store = InMemoryStore::new();
    let mut bus = CommandBus::new();
    bus.route::<Add>(Repository::new(store.clone())).unwrap();
    let again = bus
        .route::<Add>(Repository::new(store.clone()))
        .unwrap_err();
    assert!(again.to_string().contains("Add"), "{again}");

    let receipt: Receipt = bus
        .dispatch("bus", Add(3), CommandContext::new())
        .await
        .unwrap();
    assert_eq!(receipt.stream, StreamId::new("counter", "bus"));
    assert_eq!(receipt.events, 1);
    assert!(receipt.position.is_some());

    match bus.dispatch("bus", Add(-2), CommandContext::new()).await {
        Err(BusError::Execute(ExecuteError::Domain(e))) => {
            assert_eq!(e.downcast_ref::<Negative>(), Some(&Negative(-2)));
        }
        other => panic!("{other:?}"),
    }

    struct Unrouted;
    match bus.dispatch("u", Unrouted, CommandContext::new()).await {
        Err(BusError::NoHandler { command }) => assert!(command.ends_with("Unrouted"), "{command}"),
        other => panic!("{other:?}"),
    }

    // Closures are handlers too.
    struct Ping;
    bus.register::<Ping>(|id: String, _: Ping, _ctx: CommandContext| async move {
        Ok(Receipt {
            stream: StreamId::new("ping", id),
            stream_version: StreamVersion::INITIAL,
            position: None,
            events: 0,
        })
    })
    .unwrap();
    let pinged = bus
        .dispatch("p", Ping, CommandContext::new())
        .await
        .unwrap();
    assert_eq!(
        pinged.stream,
        StreamId::new("ping", "p"),
        "the id reaches the handler"
    );
}

#[test]
fn fixture_given_when_then() {
    AggregateFixture::<Counter>::given([Added { n: 2 }])
        .when(&Add(3))
        .expect_events([Added { n: 3 }]);
    AggregateFixture::<Counter>::given_no_previous_events()
        .when(&Add(-1))
        .expect_error(Negative(-1));
    AggregateFixture::<Counter>::given_no_previous_events()
        .when(&Add(-1))
        .expect_error_message("cannot add a negative amount (-1)");
}

#[test]
fn fixture_failure_shows_a_diff() {
    let panic = std::panic::catch_unwind(|| {
        AggregateFixture::<Counter>::given([])
            .when(&Add(3))
            .expect_events([Added { n: 4 }]);
    })
    .unwrap_err();
    let message = panic.downcast_ref::<String>().unwrap();
    assert!(
        message.contains("-        n: 4,") && message.contains("+        n: 3,"),
        "{message}"
    );
}

/// Sums `Added` per stream; fails on a chosen amount.
#[derive(Default, Clone)]
struct Totals {
    by_stream: HashMap<String, i64>,
    handled: u64,
    poison: Option<i64>,
}

impl Projection for Totals {
    const NAME: &'static str = "totals";
    const EVENT_TYPES: &'static [&'static str] = &["Added"];
    type Context = ();

    async fn handle(&mut self, event: &RecordedEvent, _: &mut ()) -> Result<(), ProjectionError> {
        {
            let added: Added = event.decode().map_err(|source| ProjectionError::Decode {
                projection: Self::NAME,
                position: event.position,
                source,
            })?;
            if self.poison == Some(added.n) {
                return Err(ProjectionError::Handler {
                    projection: Self::NAME,
                    event_type: event.event_type.clone(),
                    position: event.position,
                    source: format!("poison amount {}", added.n).into(),
                });
            }
            *self
                .by_stream
                .entry(event.stream.id().to_owned())
                .or_default() += added.n;
            self.handled += 1;
            Ok(())
        }
    }
}

fn fast() -> RunnerConfig {
    RunnerConfig::builder()
        .batch_size(7)
        .poll_interval(Duration::from_millis(20))
        .initial_backoff(Duration::from_millis(10))
        .max_backoff(Duration::from_millis(40))
        .standby_interval(Duration::from_millis(20))
        .build()
        .unwrap()
}

async fn noise(store: &InMemoryStore, n: usize) {
    for i in 0..n {
        let e = NewEvent {
            event_type: "Unrelated".into(),
            ..NewEvent::from_event(&Added { n: i as i64 }).unwrap()
        };
        store
            .append(&StreamId::new("other", "x"), ExpectedVersion::Any, vec![e])
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_catches_up_follows_and_reads_only_its_types() {
    let store = InMemoryStore::new();
    let repo = Repository::<Counter>::new(store.clone());
    for i in 1..=20 {
        repo.execute(&format!("c{}", i % 3), &Add(i)).await.unwrap();
    }
    noise(&store, 15).await;
    let handle = ProjectionRunner::new(Totals::default(), InProcess::new(store.clone()))
        .with_config(fast())
        .spawn();
    let last = repo
        .execute("c0", &Add(100))
        .await
        .unwrap()
        .position
        .unwrap();
    handle.wait_for(last, Duration::from_secs(5)).await.unwrap();
    noise(&store, 3).await;
    let head = store.head().await.unwrap().unwrap();
    handle
        .wait_for(head, Duration::from_secs(5))
        .await
        .expect("checkpoint passes unhandled events");
    let status = handle.status();
    assert_eq!(status.state, ProjectionState::Running);
    assert_eq!(status.processed, 21, "unhandled events are not handled");
    assert_eq!(status.lag, Some(0));
    let totals = handle.stop().await.unwrap();
    assert_eq!(totals.handled, 21);
    assert_eq!(totals.by_stream.values().sum::<i64>(), 210 + 100);
}

#[tokio::test]
async fn wait_for_times_out_cleanly_when_stopped() {
    let store = InMemoryStore::new();
    let repo = Repository::<Counter>::new(store.clone());
    let backend = Arc::new(InProcess::new(store.clone()));
    let handle = ProjectionRunner::shared(Totals::default(), backend.clone())
        .with_config(fast())
        .spawn();
    let first = repo.execute("a", &Add(1)).await.unwrap().position.unwrap();
    handle
        .wait_for(first, Duration::from_secs(5))
        .await
        .unwrap();
    let watcher = handle.watch_status();
    let _ = handle.stop().await;
    assert_eq!(watcher.borrow().state, ProjectionState::Stopped);
    let later = repo.execute("a", &Add(1)).await.unwrap().position.unwrap();
    let err = cqrs_core::subscription::wait_for(
        backend.checkpoints(),
        "totals",
        later,
        Duration::from_millis(100),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, WaitError::Timeout { reached: Some(r), .. } if r == first),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_stops_at_last_good_event_and_skip_is_recorded() {
    let store = InMemoryStore::new();
    let repo = Repository::<Counter>::new(store.clone());
    for n in [1, 2, 13, 4] {
        repo.execute("p", &Add(n)).await.unwrap();
    }
    let poison_position = store
        .read_stream(&StreamId::new("counter", "p"), StreamVersion::new(3), 1)
        .await
        .unwrap()[0]
        .position;
    let backend = Arc::new(InProcess::new(store.clone()));
    let totals = Totals {
        poison: Some(13),
        ..Totals::default()
    };
    let handle = ProjectionRunner::shared(totals, backend.clone())
        .with_config(fast())
        .spawn();
    let mut status = handle.watch_status();
    let failed = status
        .wait_for(|s| s.state == ProjectionState::Failed)
        .await
        .unwrap()
        .clone();
    assert_eq!(
        failed.last_error.as_ref().unwrap().position,
        Some(poison_position)
    );
    assert!(failed
        .last_error
        .as_ref()
        .unwrap()
        .message
        .contains("poison amount 13"));
    assert!(
        failed.checkpoint.unwrap() < poison_position,
        "stopped before the poison event"
    );
    assert_eq!(failed.lag, Some(2), "the poison event and the one after it");
    // It keeps failing (retries with backoff) until the user skips it explicitly.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(handle.status().state, ProjectionState::Failed);
    handle.skip(poison_position).await;
    let head = store.head().await.unwrap().unwrap();
    handle.wait_for(head, Duration::from_secs(5)).await.unwrap();
    assert_eq!(handle.status().lag, Some(0));
    let skipped = backend.skipped_events();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].position, poison_position);
    assert!(skipped[0].reason.contains("poison"));
    let totals = handle.stop().await.unwrap();
    assert_eq!(totals.by_stream["p"], 1 + 2 + 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_active_runner_and_handover() {
    let store = InMemoryStore::new();
    let repo = Repository::<Counter>::new(store.clone());
    let backend = Arc::new(InProcess::new(store.clone()));
    repo.execute("h", &Add(1)).await.unwrap();
    let first = ProjectionRunner::shared(Totals::default(), backend.clone())
        .with_config(fast())
        .spawn();
    let mut first_status = first.watch_status();
    first_status
        .wait_for(|s| s.state == ProjectionState::Running)
        .await
        .unwrap();
    let second = ProjectionRunner::shared(Totals::default(), backend.clone())
        .with_config(fast())
        .spawn();
    let mut second_status = second.watch_status();
    second_status
        .wait_for(|s| s.state == ProjectionState::Standby)
        .await
        .unwrap();
    first.abort();
    second_status
        .wait_for(|s| s.state == ProjectionState::Running)
        .await
        .unwrap();
    let p = repo.execute("h", &Add(1)).await.unwrap().position.unwrap();
    second.wait_for(p, Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn rebuild_reports_progress_and_equals_replay() {
    let store = InMemoryStore::new();
    let repo = Repository::<Counter>::new(store.clone());
    let backend = Arc::new(InProcess::new(store.clone()));
    for i in 0..50 {
        repo.execute(&format!("r{}", i % 5), &Add(i)).await.unwrap();
    }
    let first = ProjectionRunner::shared(Totals::default(), backend.clone())
        .with_config(fast())
        .catch_up()
        .await
        .unwrap();
    let mut reports = Vec::new();
    let rebuilt = ProjectionRunner::shared(Totals::default(), backend.clone())
        .with_config(fast())
        .rebuild(Totals::default(), || async { Ok(()) }, |p| reports.push(p))
        .await
        .unwrap();
    assert_eq!(rebuilt.by_stream, first.by_stream);
    assert_eq!(rebuilt.handled, 50);
    let last = reports.last().unwrap();
    assert_eq!((last.done, last.total), (50, 50));
    assert!(reports.len() >= 50 / 7, "progress after every batch");
    assert_eq!(
        backend
            .checkpoints()
            .load_checkpoint("totals")
            .await
            .unwrap(),
        store.head().await.unwrap()
    );
    let _ = Position::START;
}

/// Counts stream reads, to prove what the cache saves.
#[derive(Clone)]
struct CountingStore {
    inner: InMemoryStore,
    stream_reads: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Per global read, in call order: `true` for the whole log, `false` for a type-filtered one.
    whole_log_reads: std::sync::Arc<std::sync::Mutex<Vec<bool>>>,
    /// Appends refused with a concurrency conflict.
    conflicts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// When set, every stream read waits here after reading: loads that must see the same
    /// version meet at it before any of them goes on to decide and append.
    load_gate: Option<std::sync::Arc<tokio::sync::Barrier>>,
}

impl CountingStore {
    fn over(inner: InMemoryStore) -> Self {
        Self {
            inner,
            stream_reads: std::sync::Arc::default(),
            whole_log_reads: std::sync::Arc::default(),
            conflicts: std::sync::Arc::default(),
            load_gate: None,
        }
    }

    /// Stream reads go in groups of `loads`, so that many loads see the same version.
    fn gated(inner: InMemoryStore, loads: usize) -> Self {
        Self {
            load_gate: Some(std::sync::Arc::new(tokio::sync::Barrier::new(loads))),
            ..Self::over(inner)
        }
    }

    fn conflicts(&self) -> u32 {
        let n = self.conflicts.load(std::sync::atomic::Ordering::SeqCst);
        u32::try_from(n).unwrap()
    }
}

#[async_trait::async_trait]
impl EventStore for CountingStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<cqrs_core::AppendResult, cqrs_core::StoreError> {
        let appended = self.inner.append(stream, expected, events).await;
        if let Err(cqrs_core::StoreError::Concurrency(_)) = &appended {
            self.conflicts
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        appended
    }
    async fn read_stream(
        &self,
        stream: &StreamId,
        from: StreamVersion,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, cqrs_core::StoreError> {
        self.stream_reads
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let read = self.inner.read_stream(stream, from, limit).await;
        if let Some(gate) = &self.load_gate {
            gate.wait().await;
        }
        read
    }
    async fn read_all(
        &self,
        after: Position,
        types: cqrs_core::EventTypes<'_>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, cqrs_core::StoreError> {
        self.whole_log_reads
            .lock()
            .unwrap()
            .push(types == cqrs_core::EventTypes::All);
        self.inner.read_all(after, types, limit).await
    }
    async fn find_event(
        &self,
        id: cqrs_core::EventId,
    ) -> Result<Option<RecordedEvent>, cqrs_core::StoreError> {
        self.inner.find_event(id).await
    }

    async fn stream_version(
        &self,
        stream: &StreamId,
    ) -> Result<StreamVersion, cqrs_core::StoreError> {
        self.inner.stream_version(stream).await
    }
    async fn head(&self) -> Result<Option<Position>, cqrs_core::StoreError> {
        self.inner.head().await
    }
    async fn count_after(
        &self,
        after: Position,
        types: cqrs_core::EventTypes<'_>,
    ) -> Result<u64, cqrs_core::StoreError> {
        self.inner.count_after(after, types).await
    }
}

#[tokio::test]
async fn the_default_cache_skips_loads_and_recovers_from_stale_entries() {
    let inner = InMemoryStore::new();
    let reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let store = CountingStore {
        stream_reads: reads.clone(),
        whole_log_reads: std::sync::Arc::default(),
        ..CountingStore::over(inner.clone())
    };
    // The cache is on by default.
    let repo = Repository::<Counter>::new(store);
    for n in 1..=10 {
        repo.execute("k", &Add(n)).await.unwrap();
    }
    assert_eq!(
        reads.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the first command loads"
    );
    assert!(matches!(
        repo.execute("k", &Add(-5)).await,
        Err(ExecuteError::Domain(_))
    ));

    // Another writer (another process) appends behind the cache's back.
    let outsider = Repository::<Counter>::new(inner.clone());
    outsider.execute("k", &Add(1000)).await.unwrap();
    let outcome = repo.execute("k", &Add(1)).await.unwrap();
    assert_eq!(
        outcome.attempts, 2,
        "the stale entry conflicted and was re-executed"
    );
    assert_eq!(outcome.stream_version, StreamVersion::new(12));
    assert_eq!(repo.load("k").await.unwrap().state.total, 55 + 1000 + 1);
    // The refreshed entry is used again.
    let before = reads.load(std::sync::atomic::Ordering::SeqCst);
    repo.execute("k", &Add(1)).await.unwrap();
    assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), before);
}

/// Adds `n` unless the total would pass `limit`: a decision that depends on the state.
struct AddUpTo {
    n: i64,
    limit: i64,
}

#[derive(Debug, PartialEq, thiserror::Error)]
#[error("the total would pass the limit")]
struct OverLimit;

impl cqrs_core::Handle<AddUpTo> for Counter {
    type Error = OverLimit;
    fn handle(&self, command: &AddUpTo) -> Result<Vec<Added>, OverLimit> {
        if self.total + command.n > command.limit {
            return Err(OverLimit);
        }
        Ok(vec![Added { n: command.n }])
    }
}

#[tokio::test]
async fn a_stale_cache_entry_never_rejects_a_command() {
    let inner = InMemoryStore::new();
    let reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let store = CountingStore {
        stream_reads: reads.clone(),
        whole_log_reads: std::sync::Arc::default(),
        ..CountingStore::over(inner.clone())
    };
    let repo = Repository::<Counter>::new(store);
    repo.execute("k", &Add(10)).await.unwrap();
    // Another process takes 8 off behind the cache's back: the cached total (10) is stale.
    let stream = StreamId::new("counter", "k");
    inner
        .append(
            &stream,
            ExpectedVersion::Exact(StreamVersion::new(1)),
            vec![NewEvent::from_event(&Added { n: -8 }).unwrap()],
        )
        .await
        .unwrap();
    // 10 + 5 passes 12, 2 + 5 does not: decided on the stale entry, this would be rejected.
    let outcome = repo
        .execute("k", &AddUpTo { n: 5, limit: 12 })
        .await
        .unwrap();
    assert_eq!(outcome.stream_version, StreamVersion::new(3));
    assert_eq!(repo.load("k").await.unwrap().state.total, 7);

    // A rejection on a current entry stands, after one read that finds nothing new.
    let before = reads.load(std::sync::atomic::Ordering::SeqCst);
    let rejected = repo.execute("k", &AddUpTo { n: 6, limit: 12 }).await;
    assert!(
        matches!(rejected, Err(ExecuteError::Domain(OverLimit))),
        "{rejected:?}"
    );
    assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), before + 1);
}

#[tokio::test]
async fn the_cache_drops_the_least_recently_used_and_can_be_turned_off() {
    let reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let store = CountingStore {
        stream_reads: reads.clone(),
        whole_log_reads: std::sync::Arc::default(),
        ..CountingStore::over(InMemoryStore::new())
    };
    let loads = || reads.load(std::sync::atomic::Ordering::SeqCst);
    let repo = Repository::<Counter>::new(store.clone()).with_cache(2);
    for id in ["a", "b", "a", "c"] {
        repo.execute(id, &Add(1)).await.unwrap();
    }
    assert_eq!(loads(), 3, "a, b and c loaded once each");
    // "b" was used least recently when "c" came in: it was dropped, "a" was kept.
    repo.execute("a", &Add(1)).await.unwrap();
    assert_eq!(loads(), 3, "a is still cached");
    repo.execute("b", &Add(1)).await.unwrap();
    assert_eq!(loads(), 4, "b was evicted and loads again");

    let uncached = Repository::<Counter>::new(store).without_cache();
    for _ in 0..3 {
        uncached.execute("d", &Add(1)).await.unwrap();
    }
    assert_eq!(loads(), 4 + 3, "without the cache every command loads");
}

/// Every public future can be spawned: a compile-time proof.
#[allow(dead_code)]
fn public_futures_are_send(repo: Repository<Counter>, store: InMemoryStore, bus: CommandBus) {
    fn is_send<T: Send>(_: T) {}
    is_send(async move {
        let _ = repo.execute("x", &Add(1)).await;
        let _ = repo.execute_in("x", &Add(1), &CommandContext::new()).await;
        let _ = repo.load("x").await;
        let _ = store
            .append(&StreamId::new("a", "b"), ExpectedVersion::Any, vec![])
            .await;
        let _ = store
            .read_all(Position::START, cqrs_core::EventTypes::All, 1)
            .await;
        let _ = bus.dispatch("x", Add(1), CommandContext::new()).await;
        let handle =
            ProjectionRunner::new(Totals::default(), InProcess::new(store.clone())).spawn();
        let _ = handle
            .wait_for(Position::START, Duration::from_secs(1))
            .await;
        let _ = ProjectionRunner::new(Totals::default(), InProcess::new(store.clone()))
            .catch_up()
            .await;
        let _ = ProjectionRunner::new(Totals::default(), InProcess::new(store.clone()))
            .rebuild_then(
                Totals::default(),
                || async { Ok(()) },
                |_| {},
                |_| async { Ok(()) },
            )
            .await;
        let _ = ProjectionRunner::new(Totals::default(), InProcess::new(store))
            .catch_up_then(|_| {}, |_| async { Ok(()) })
            .await;
    });
}

#[tokio::test]
async fn inline_projection_commits_with_the_append_or_not_at_all() {
    let model = cqrs_core::memory::InlineReadModel::new(Totals {
        poison: Some(13),
        ..Totals::default()
    });
    let store = InMemoryStore::new().with_inline(model.clone());
    let repo = Repository::<Counter>::new(store.clone());
    repo.execute("i", &Add(2)).await.unwrap();
    repo.execute("i", &Add(3)).await.unwrap();
    assert_eq!(
        model.read(|t| t.by_stream["i"]),
        5,
        "visible as soon as the command returns"
    );

    let err = repo.execute("i", &Add(13)).await.unwrap_err();
    let message = chain(&err);
    assert!(message.contains("poison amount 13"), "{message}");
    assert_eq!(
        model.snapshot().by_stream["i"],
        5,
        "the failed append changed the read model"
    );
    assert_eq!(
        repo.load("i").await.unwrap().version,
        StreamVersion::new(2),
        "events were kept"
    );
    assert_eq!(
        store
            .count_after(Position::START, cqrs_core::EventTypes::All)
            .await
            .unwrap(),
        2
    );

    // Later appends continue with consistent positions.
    let p = repo.execute("i", &Add(1)).await.unwrap().position.unwrap();
    assert_eq!(store.head().await.unwrap(), Some(p));
    assert_eq!(model.snapshot().by_stream["i"], 6);
}

/// While most events are handled, runners read the whole log and drop the rest themselves; a batch
/// that is mostly unhandled switches them to the store's filtered read for good. Either way they
/// handle exactly the events of their types, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runners_read_the_whole_log_while_it_is_mostly_theirs() {
    let store = CountingStore {
        stream_reads: std::sync::Arc::default(),
        whole_log_reads: std::sync::Arc::default(),
        ..CountingStore::over(InMemoryStore::new())
    };
    let repo = Repository::<Counter>::new(store.inner.clone());
    for i in 1..=30 {
        repo.execute(&format!("w{}", i % 4), &Add(i)).await.unwrap();
    }
    noise(&store.inner, 40).await;
    for i in 31..=50 {
        repo.execute(&format!("w{}", i % 4), &Add(i)).await.unwrap();
    }
    let expected_sum: i64 = (1..=50).sum();
    let switched = |reads: &[bool]| {
        let first_filtered = reads.iter().position(|whole| !whole);
        assert!(
            matches!(first_filtered, Some(n) if n > 0),
            "starts with whole-log reads, then filters: {reads:?}"
        );
        assert!(
            reads[first_filtered.unwrap()..].iter().all(|whole| !whole),
            "never goes back: {reads:?}"
        );
    };

    let mut reports = Vec::new();
    let caught_up = ProjectionRunner::new(Totals::default(), InProcess::new(store.clone()))
        .with_config(fast())
        .catch_up_with_progress(|p| reports.push(p))
        .await
        .unwrap();
    assert_eq!(caught_up.handled, 50);
    assert_eq!(caught_up.by_stream.values().sum::<i64>(), expected_sum);
    assert_eq!(reports.last().map(|p| (p.done, p.total)), Some((50, 50)));
    switched(&store.whole_log_reads.lock().unwrap());

    store.whole_log_reads.lock().unwrap().clear();
    let handle = ProjectionRunner::new(Totals::default(), InProcess::new(store.clone()))
        .with_config(fast())
        .spawn();
    let head = store.head().await.unwrap().unwrap();
    handle.wait_for(head, Duration::from_secs(5)).await.unwrap();
    let live = handle.stop().await.unwrap();
    assert_eq!(live.handled, 50);
    assert_eq!(live.by_stream, caught_up.by_stream);
    switched(&store.whole_log_reads.lock().unwrap());
}

#[test]
fn runner_config_rejects_settings_a_runner_cannot_work_with() {
    let zero_batch = RunnerConfig::builder().batch_size(0).build().unwrap_err();
    assert_eq!(zero_batch.setting, "batch_size");
    assert!(
        zero_batch.to_string().contains("at least 1"),
        "{zero_batch}"
    );
    for (builder, setting) in [
        (
            RunnerConfig::builder().poll_interval(Duration::ZERO),
            "poll_interval",
        ),
        (
            RunnerConfig::builder().initial_backoff(Duration::ZERO),
            "initial_backoff",
        ),
        (
            RunnerConfig::builder().standby_interval(Duration::ZERO),
            "standby_interval",
        ),
        (
            RunnerConfig::builder()
                .initial_backoff(Duration::from_secs(2))
                .max_backoff(Duration::from_secs(1)),
            "max_backoff",
        ),
    ] {
        assert_eq!(builder.build().unwrap_err().setting, setting);
    }
    let built = RunnerConfig::builder().batch_size(1).build().unwrap();
    assert_eq!(built.batch_size(), 1);
    assert_eq!(
        RunnerConfig::builder().build().unwrap(),
        RunnerConfig::default()
    );
}

/// A backend whose lease acquisition panics: the runner task dies outside any handler.
struct PanickingLease(InProcess<InMemoryStore>);

impl<P: Projection<Context = ()>> cqrs_core::backend::ProjectionBackend<P> for PanickingLease {
    fn events(&self) -> &dyn EventStore {
        cqrs_core::backend::ProjectionBackend::<P>::events(&self.0)
    }
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, cqrs_core::StoreError> {
        cqrs_core::backend::ProjectionBackend::<P>::load_checkpoint(&self.0, name).await
    }
    async fn commit_batch(
        &self,
        projection: &mut P,
        name: &str,
        expected: Option<Position>,
        events: &[RecordedEvent],
        to: Position,
    ) -> Result<(), cqrs_core::backend::BatchError> {
        self.0
            .commit_batch(projection, name, expected, events, to)
            .await
    }
    async fn reset_checkpoint(&self, name: &str) -> Result<(), cqrs_core::StoreError> {
        cqrs_core::backend::ProjectionBackend::<P>::reset_checkpoint(&self.0, name).await
    }
    async fn record_skip(
        &self,
        name: &str,
        expected: Option<Position>,
        event: &cqrs_core::backend::SkipTarget,
        reason: &str,
    ) -> Result<(), cqrs_core::StoreError> {
        cqrs_core::backend::ProjectionBackend::<P>::record_skip(
            &self.0, name, expected, event, reason,
        )
        .await
    }
    async fn skipped_events(
        &self,
        name: &str,
    ) -> Result<Vec<cqrs_core::subscription::SkippedEvent>, cqrs_core::StoreError> {
        cqrs_core::backend::ProjectionBackend::<P>::skipped_events(&self.0, name).await
    }
    async fn record_failure(
        &self,
        name: &str,
        failure: Option<&cqrs_core::subscription::ProjectionFailure>,
    ) -> Result<(), cqrs_core::StoreError> {
        cqrs_core::backend::ProjectionBackend::<P>::record_failure(&self.0, name, failure).await
    }
    async fn last_failure(
        &self,
        name: &str,
    ) -> Result<Option<cqrs_core::subscription::RecordedFailure>, cqrs_core::StoreError> {
        cqrs_core::backend::ProjectionBackend::<P>::last_failure(&self.0, name).await
    }
    async fn acquire_lease(
        &self,
        _name: &str,
    ) -> Result<Option<Box<dyn cqrs_core::backend::Lease>>, cqrs_core::StoreError> {
        panic!("the lease table is on fire")
    }
    async fn wait_for_append(&self, after: Position, timeout: Duration) {
        cqrs_core::backend::ProjectionBackend::<P>::wait_for_append(&self.0, after, timeout).await;
    }
}

#[tokio::test]
async fn a_runner_killed_by_a_panic_does_not_say_it_runs() {
    let backend = PanickingLease(InProcess::new(InMemoryStore::new()));
    let handle = ProjectionRunner::new(Totals::default(), backend)
        .with_config(fast())
        .spawn();
    let mut status = handle.watch_status();
    let ended = tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.state == ProjectionState::Stopped),
    )
    .await
    .expect("the status says the runner stopped")
    .unwrap()
    .clone();
    let failure = ended.last_error.expect("the panic is reported");
    assert_eq!(failure.cause, cqrs_core::subscription::FailureCause::Panic);
    assert!(failure.message.contains("on fire"), "{failure:?}");
    assert!(!failure.skippable());
    assert!(handle.stop().await.is_none());
}

/// An error and its sources on one line, as `anyhow`'s `{:#}` prints them.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// Every event, undecoded: a catch-all handler subscribes to the whole log.
#[derive(Default)]
struct Everything {
    seen: Vec<(String, String)>,
}

#[cqrs_core::projection(name = "everything")]
impl Everything {
    fn any(&mut self, event: &RecordedEvent) {
        self.seen.push((
            event.stream.stream_type().to_owned(),
            event.event_type.clone(),
        ));
    }
}

/// Every event of the `counter` streams (the category of an aggregate).
#[derive(Default)]
struct CounterCategory {
    seen: Vec<String>,
}

#[cqrs_core::projection(name = "counter-category", streams(Counter))]
impl CounterCategory {
    fn any(&mut self, event: &RecordedEvent) {
        self.seen.push(event.stream.stream_type().to_owned());
    }
}

/// `Added` from `other` streams only (typed handlers narrowed to a stream type by name), and
/// every other event of those streams through the catch-all.
#[derive(Default)]
struct OtherAdded {
    added: i64,
    rest: u64,
}

#[cqrs_core::projection(name = "other-added", streams("other"))]
impl OtherAdded {
    fn added(&mut self, event: &Added) {
        self.added += event.n;
    }

    fn rest(&mut self, _: &RecordedEvent) {
        self.rest += 1;
    }
}

/// Catch-all and category subscriptions run on the same runner and checkpoints as typed ones:
/// the runner feeds exactly the subscribed events, and moves the checkpoint past the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_all_and_category_projections_get_exactly_their_events() {
    let store = InMemoryStore::new();
    let repo = Repository::<Counter>::new(store.clone());
    for i in 1..=10 {
        repo.execute(&format!("c{}", i % 3), &Add(i)).await.unwrap();
    }
    noise(&store, 8).await;
    for n in [5, 7] {
        let added = NewEvent::from_event(&Added { n }).unwrap();
        store
            .append(
                &StreamId::new("other", "y"),
                ExpectedVersion::Any,
                vec![added],
            )
            .await
            .unwrap();
    }
    let head = store.head().await.unwrap().unwrap();

    assert_eq!(
        <Everything as Projection>::SUBSCRIPTION,
        cqrs_core::Subscription::ALL
    );
    let everything = ProjectionRunner::new(Everything::default(), InProcess::new(store.clone()))
        .with_config(fast())
        .catch_up()
        .await
        .unwrap();
    assert_eq!(everything.seen.len(), 20, "{:?}", everything.seen);
    assert_eq!(everything.seen[10], ("other".into(), "Unrelated".into()));

    let handle = ProjectionRunner::new(CounterCategory::default(), InProcess::new(store.clone()))
        .with_config(fast())
        .spawn();
    handle
        .wait_for(head, Duration::from_secs(5))
        .await
        .expect("the checkpoint passes other streams' events");
    let category = handle.stop().await.unwrap();
    assert_eq!(category.seen, vec!["counter".to_owned(); 10]);

    let other = ProjectionRunner::new(OtherAdded::default(), InProcess::new(store.clone()))
        .with_config(fast())
        .catch_up()
        .await
        .unwrap();
    assert_eq!((other.added, other.rest), (12, 8));
}

/// Delivers each batch to a system outside the backend (here a list) from its flush; while the
/// system is down, the flush fails with `ProjectionError::Unavailable`.
struct Outbox {
    down: Arc<std::sync::atomic::AtomicBool>,
    pending: Vec<Position>,
    delivered: Arc<std::sync::Mutex<Vec<Position>>>,
}

impl Projection for Outbox {
    const NAME: &'static str = "outbox";
    const EVENT_TYPES: &'static [&'static str] = &[];
    const SUBSCRIPTION: cqrs_core::Subscription = cqrs_core::Subscription::ALL;
    type Context = ();

    async fn handle(&mut self, event: &RecordedEvent, _: &mut ()) -> Result<(), ProjectionError> {
        self.pending.push(event.position);
        Ok(())
    }

    async fn flush(&mut self, _: &mut ()) -> Result<(), ProjectionError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ProjectionError::Unavailable {
                projection: Self::NAME,
                source: "the broker is down".into(),
            });
        }
        let delivered = std::mem::take(&mut self.pending);
        self.delivered.lock().unwrap().extend(delivered);
        Ok(())
    }

    fn discard(&mut self) {
        self.pending.clear();
    }
}

/// A system the projection delivers to is down: the status names it (`Unavailable`, no position,
/// not skippable, nothing checkpointed), and once it is back the runner delivers everything by
/// itself, once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unavailable_system_is_retried_never_skippable() {
    let store = InMemoryStore::new();
    let repo = Repository::<Counter>::new(store.clone());
    for i in 1..=5 {
        repo.execute("c", &Add(i)).await.unwrap();
    }
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let delivered = Arc::new(std::sync::Mutex::new(Vec::new()));
    let outbox = Outbox {
        down: Arc::clone(&down),
        pending: Vec::new(),
        delivered: Arc::clone(&delivered),
    };
    let handle = ProjectionRunner::new(outbox, InProcess::new(store.clone()))
        .with_config(fast())
        .spawn();
    let mut status = handle.watch_status();
    let failed = tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.last_error.is_some()),
    )
    .await
    .expect("the failure is reported")
    .unwrap()
    .clone();
    let failure = failed.last_error.unwrap();
    assert_eq!(
        failure.cause,
        cqrs_core::subscription::FailureCause::Unavailable,
        "{failure:?}"
    );
    assert_eq!(failure.position, None);
    assert!(!failure.skippable());
    assert!(
        failure.message.contains("the broker is down"),
        "{failure:?}"
    );
    assert_eq!(failed.checkpoint, None);
    assert!(delivered.lock().unwrap().is_empty());

    down.store(false, std::sync::atomic::Ordering::SeqCst);
    let head = store.committed_head().await.unwrap().unwrap();
    handle
        .wait_for(head, Duration::from_secs(10))
        .await
        .expect("delivered once the system is back");
    let all: Vec<Position> = store
        .read_all(Position::START, cqrs_core::EventTypes::All, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(*delivered.lock().unwrap(), all);
    handle.stop().await;
}
