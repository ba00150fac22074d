//! Projections on SQLite: exactly once across SIGKILLs of runner processes, inline projections
//! all-or-nothing with their append.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cqrs_core::store::read_all_batched;
use cqrs_core::subscription::{ProjectionRunner, RunnerConfig};
use cqrs_core::{
    CheckpointStore, EventId, EventStore, EventTypes, ExpectedVersion, NewEvent, Position,
    Projection, ProjectionError, RecordedEvent, StoreError, StreamId,
};
use cqrs_postgres::PostgresStore;
use cqrs_sqlite::{SqliteProjections, SqliteStore};
use futures_util::TryStreamExt;
use serde_json::json;
use sqlx::SqliteConnection;
use std::sync::Arc;

use crate::{parent_alive, start_child, Rng, TempDir};

/// Balance and event count per account, in table `balances` of the store's file.
#[derive(Debug, Clone, Default)]
struct Balances;

impl Balances {
    async fn create(store: &SqliteStore) {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS balances \
             (account TEXT PRIMARY KEY, total INTEGER NOT NULL, events INTEGER NOT NULL)",
        )
        .execute(store.pool())
        .await
        .unwrap();
    }

    async fn rows(store: &SqliteStore) -> BTreeMap<String, (i64, i64)> {
        let rows: Vec<(String, i64, i64)> =
            sqlx::query_as("SELECT account, total, events FROM balances")
                .fetch_all(store.pool())
                .await
                .unwrap();
        rows.into_iter().map(|(a, t, e)| (a, (t, e))).collect()
    }
}

impl Projection for Balances {
    const NAME: &'static str = "balances";
    const EVENT_TYPES: &'static [&'static str] = &["Deposited"];
    type Context = SqliteConnection;

    async fn handle<'a>(
        &'a mut self,
        event: &'a RecordedEvent,
        db: &'a mut SqliteConnection,
    ) -> Result<(), ProjectionError> {
        let amount = event.payload.to_value().unwrap()["amount"]
            .as_i64()
            .unwrap_or_default();
        let failed = |source: sqlx::Error| ProjectionError::Handler {
            projection: Self::NAME,
            event_type: event.event_type.clone(),
            position: event.position,
            source: source.into(),
        };
        if amount < 0 {
            // Refused: an inline projection's failure must undo the append.
            return Err(failed(sqlx::Error::Protocol(format!(
                "negative deposit {amount}"
            ))));
        }
        sqlx::query(
            "INSERT INTO balances (account, total, events) VALUES (?1, ?2, 1) \
             ON CONFLICT (account) DO UPDATE SET total = total + excluded.total, \
             events = events + 1",
        )
        .bind(event.stream.id())
        .bind(amount)
        .execute(db)
        .await
        .map_err(failed)?;
        Ok(())
    }
}

fn deposit(amount: i64) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "Deposited".into(),
        schema_version: 1,
        payload: json!({ "amount": amount }),
        metadata: Default::default(),
    }
}

fn config() -> RunnerConfig {
    RunnerConfig::builder()
        .batch_size(7)
        .poll_interval(Duration::from_millis(50))
        .initial_backoff(Duration::from_millis(10))
        .max_backoff(Duration::from_millis(50))
        .standby_interval(Duration::from_millis(20))
        .build()
        .unwrap()
}

/// The read model a replay of the log gives.
async fn replay(store: &SqliteStore) -> BTreeMap<String, (i64, i64)> {
    let all: Vec<RecordedEvent> = read_all_batched(
        store,
        Position::START,
        EventTypes::Only(&["Deposited"]),
        500,
    )
    .try_collect()
    .await
    .unwrap();
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for event in all {
        let row = expected.entry(event.stream.id().to_owned()).or_default();
        row.0 += event.payload.to_value().unwrap()["amount"]
            .as_i64()
            .unwrap();
        row.1 += 1;
    }
    expected
}

/// Set: the child reads the events from this schema of the PostgreSQL at `DATABASE_URL`, and keeps
/// only the read model (and its checkpoint) in the file.
const CHILD_EVENTS_SCHEMA: &str = "CQRS_CHILD_EVENTS_SCHEMA";

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn postgres_events(schema: &str) -> PostgresStore {
    PostgresStore::connect(&database_url())
        .await
        .unwrap_or_else(|e| panic!("this test needs PostgreSQL at {}: {e}", database_url()))
        .with_schema(schema)
        .unwrap()
}

/// Not a test: a projection runner process for `runner_killed_at_random_points_applies_each_event_once`
/// and `a_read_file_fed_from_postgres_is_exact_across_sigkills`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "entry point of a child process"]
async fn runner_child() {
    let store = SqliteStore::open(crate::child_db()).await.unwrap();
    let backend = match std::env::var(CHILD_EVENTS_SCHEMA) {
        Ok(schema) => {
            SqliteProjections::with_event_source(Arc::new(postgres_events(&schema).await), store)
        }
        Err(_) => SqliteProjections::new(store),
    };
    let handle = ProjectionRunner::new(Balances, backend)
        .with_config(config())
        .spawn();
    let (parent, started) = (std::os::unix::process::parent_id(), Instant::now());
    while parent_alive(parent, started) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    handle.abort();
}

/// Runner processes (one active, one standby) are SIGKILLed at random moments while this process
/// appends: the read model ends equal to a replay of the log (nothing lost, nothing applied twice,
/// which the per-account event counts show) and the checkpoint reaches the head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_killed_at_random_points_applies_each_event_once() {
    let mut rng = Rng::seeded("runner_killed_at_random_points_applies_each_event_once");
    let dir = TempDir::new();
    let store = SqliteStore::open(dir.db()).await.unwrap();
    Balances::create(&store).await;
    let writers = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut appended = 0u64;
            for i in 0..400i64 {
                let account = StreamId::new("account", format!("acc-{}", i % 7));
                store
                    .append(&account, ExpectedVersion::Any, vec![deposit(i)])
                    .await
                    .unwrap();
                appended += 1;
                // Spread over the kills, so they land while there is work to do.
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            appended
        })
    };
    let mut children = [
        start_child("projections::runner_child", &dir.db(), &[]),
        start_child("projections::runner_child", &dir.db(), &[]),
    ];
    let mut progress = Vec::new();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(80 + rng.below(200))).await;
        let victim = rng.below(2) as usize;
        children[victim].kill();
        progress.push(store.load_checkpoint(Balances::NAME).await.unwrap());
        children[victim] = start_child("projections::runner_child", &dir.db(), &[]);
    }
    let appended = writers.await.unwrap();
    for child in &mut children {
        child.kill();
    }
    eprintln!("{appended} events; checkpoints at the kills: {progress:?}");
    // Whatever the killed runners left, a catch-up here finishes the work exactly once.
    ProjectionRunner::new(Balances, SqliteProjections::new(store.clone()))
        .with_config(config())
        .catch_up()
        .await
        .unwrap();
    assert_eq!(Balances::rows(&store).await, replay(&store).await);
    assert_eq!(
        store.load_checkpoint(Balances::NAME).await.unwrap(),
        store.head().await.unwrap()
    );
    let total: i64 = Balances::rows(&store).await.values().map(|r| r.1).sum();
    assert_eq!(total as u64, appended);
    let distinct: std::collections::HashSet<_> = progress.iter().collect();
    assert!(
        distinct.len() > 2,
        "the kills landed while there was work: {progress:?}"
    );
}

/// A local read replica: runner processes keep the read model and its checkpoint in a SQLite file
/// and read the events from PostgreSQL; they are SIGKILLed at random moments while this process
/// appends. The file's read model ends equal to a replay of the PostgreSQL log, each event applied
/// once, and PostgreSQL holds no checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_file_fed_from_postgres_is_exact_across_sigkills() {
    let mut rng = Rng::seeded("a_read_file_fed_from_postgres_is_exact_across_sigkills");
    let dir = TempDir::new();
    let read = SqliteStore::open(dir.db()).await.unwrap();
    Balances::create(&read).await;
    let schema = format!("sqlite_replica_{}", uuid::Uuid::now_v7().simple());
    let events = postgres_events(&schema).await;
    events.migrate().await.unwrap();
    let writers = {
        let events = events.clone();
        tokio::spawn(async move {
            for i in 0..400i64 {
                let account = StreamId::new("account", format!("acc-{}", i % 7));
                events
                    .append(&account, ExpectedVersion::Any, vec![deposit(i)])
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        })
    };
    let env = [(CHILD_EVENTS_SCHEMA, schema.clone())];
    let start = || start_child("projections::runner_child", &dir.db(), &env);
    let mut children = [start(), start()];
    let mut progress = Vec::new();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(80 + rng.below(200))).await;
        let victim = rng.below(2) as usize;
        children[victim].kill();
        progress.push(read.load_checkpoint(Balances::NAME).await.unwrap());
        children[victim] = start();
    }
    writers.await.unwrap();
    for child in &mut children {
        child.kill();
    }
    eprintln!("checkpoints at the kills: {progress:?}");
    let backend = SqliteProjections::with_event_source(Arc::new(events.clone()), read.clone());
    ProjectionRunner::new(Balances, backend)
        .with_config(config())
        .catch_up()
        .await
        .unwrap();
    let all: Vec<RecordedEvent> = read_all_batched(
        &events,
        Position::START,
        EventTypes::Only(&["Deposited"]),
        500,
    )
    .try_collect()
    .await
    .unwrap();
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for event in &all {
        let row = expected.entry(event.stream.id().to_owned()).or_default();
        row.0 += event.payload.to_value().unwrap()["amount"]
            .as_i64()
            .unwrap();
        row.1 += 1;
    }
    assert_eq!(Balances::rows(&read).await, expected);
    assert_eq!(all.len(), 400);
    assert_eq!(
        read.load_checkpoint(Balances::NAME).await.unwrap(),
        events.head().await.unwrap()
    );
    assert_eq!(events.load_checkpoint(Balances::NAME).await.unwrap(), None);
    let distinct: std::collections::HashSet<_> = progress.iter().collect();
    assert!(
        distinct.len() > 2,
        "the kills landed while there was work: {progress:?}"
    );
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(events.pool())
    .await
    .unwrap();
}

/// An inline projection commits with its append, and its failure undoes the append alone: the
/// other appends queued in the same group commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_projection_is_all_or_nothing_with_its_append() {
    let dir = TempDir::new();
    let plain = SqliteStore::open(dir.db()).await.unwrap();
    Balances::create(&plain).await;
    let store = plain.clone().with_inline(Balances);
    let account = StreamId::new("account", "inline");
    store
        .append(
            &account,
            ExpectedVersion::NoStream,
            vec![deposit(5), deposit(7)],
        )
        .await
        .unwrap();
    assert_eq!(
        Balances::rows(&store).await.get("inline"),
        Some(&(12, 2)),
        "visible as soon as the append returns"
    );
    // Refused by the projection, in the middle of a batch, while other appends share its group.
    let mut tasks = Vec::new();
    for i in 0..10i64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new("account", format!("other-{i}"));
            let amount = if i == 3 { -1 } else { i };
            store
                .append(
                    &stream,
                    ExpectedVersion::NoStream,
                    vec![deposit(1), deposit(amount)],
                )
                .await
        }));
    }
    for (i, task) in tasks.into_iter().enumerate() {
        let outcome = task.await.unwrap();
        if i == 3 {
            assert!(
                matches!(outcome, Err(StoreError::InlineProjection(_))),
                "{outcome:?}"
            );
        } else {
            outcome.unwrap();
        }
    }
    let refused = StreamId::new("account", "other-3");
    assert_eq!(store.stream_version(&refused).await.unwrap().get(), 0);
    let rows = Balances::rows(&store).await;
    assert!(!rows.contains_key("other-3"), "the refused append's rows");
    assert_eq!(rows.len(), 10);
    assert_eq!(rows, replay(&store).await);
    // An idempotent retry does not run the projection again.
    let again = vec![deposit(1)];
    let stream = StreamId::new("account", "retry");
    let first = store
        .append(&stream, ExpectedVersion::NoStream, again.clone())
        .await
        .unwrap();
    let second = store
        .append(&stream, ExpectedVersion::NoStream, again)
        .await
        .unwrap();
    assert_eq!(first, second);
    assert_eq!(Balances::rows(&store).await.get("retry"), Some(&(1, 1)));
}

/// A blue/green switch hands the built version's recorded skips to the live name (the version
/// that skipped them is now the live one) and drops the replaced version's.
#[tokio::test]
async fn a_promotion_hands_the_built_versions_skips_to_the_live_name() {
    let dir = TempDir::new();
    let store = SqliteStore::open(dir.db()).await.unwrap();
    store
        .append(
            &StreamId::new("account", "a"),
            ExpectedVersion::NoStream,
            vec![deposit(1), deposit(2)],
        )
        .await
        .unwrap();
    let events = store
        .read_all(Position::START, EventTypes::All, 10)
        .await
        .unwrap();
    let backend = SqliteProjections::new(store.clone());
    let skip = |name: &'static str, event: usize, reason: &'static str| {
        let target = cqrs_core::backend::SkipTarget::of(&events[event]);
        let backend = backend.clone();
        async move {
            cqrs_core::backend::ProjectionBackend::<Balances>::record_skip(
                &backend, name, None, &target, reason,
            )
            .await
            .unwrap();
        }
    };
    skip("balances", 0, "old version").await;
    skip("balances.next", 1, "new version").await;
    backend
        .promote("balances", "balances.next", &[])
        .await
        .unwrap();
    let skipped = |name: &'static str| {
        let backend = backend.clone();
        async move {
            cqrs_core::backend::ProjectionBackend::<Balances>::skipped_events(&backend, name)
                .await
                .unwrap()
        }
    };
    let live = skipped("balances").await;
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].reason, "new version");
    assert_eq!(live[0].position, events[1].position);
    assert!(skipped("balances.next").await.is_empty());
}
