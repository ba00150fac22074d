//! Exactly once under SIGKILL: runner processes with their read model in Redis, fed from a
//! PostgreSQL event store, are killed at random moments while writers append.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_core::prelude::*;
use cqrs_core::subscription::{ProjectionRunner, RunnerConfig};
use cqrs_core::{CheckpointStore, EventStore, NewEvent};
use cqrs_postgres::PostgresStore;
use cqrs_redis::RedisProjections;

use crate::{
    delete_prefix, read_model, redis_url, replay, wait_checkpoint, Balances, Deposited, Rng,
};

const CHILD_SCHEMA: &str = "CQRS_REDIS_CHILD_SCHEMA";
const CHILD_PREFIX: &str = "CQRS_REDIS_CHILD_PREFIX";
/// A dead runner's lease expires after this; a standby then takes over.
const LEASE_TTL: Duration = Duration::from_millis(400);

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn event_store(schema: &str) -> PostgresStore {
    PostgresStore::connect(&database_url())
        .await
        .unwrap_or_else(|e| panic!("this test needs PostgreSQL at {}: {e}", database_url()))
        .with_schema(schema)
        .unwrap()
}

async fn backend(store: &PostgresStore, prefix: &str) -> RedisProjections {
    RedisProjections::connect(Arc::new(store.clone()), &redis_url())
        .await
        .unwrap()
        .with_key_prefix(prefix)
        .with_lease_ttl(LEASE_TTL)
}

/// Not a test: the body of the child processes `exactly_once_in_redis_across_sigkills` starts.
/// Runs the projection until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "entry point of a child process, started by exactly_once_in_redis_across_sigkills"]
async fn redis_runner_child() {
    let schema = std::env::var(CHILD_SCHEMA).expect("started by a test");
    let prefix = std::env::var(CHILD_PREFIX).expect("started by a test");
    let store = event_store(&schema).await;
    let config = RunnerConfig::builder()
        .batch_size(40)
        .poll_interval(Duration::from_millis(100))
        .initial_backoff(Duration::from_millis(10))
        .max_backoff(Duration::from_millis(100))
        .standby_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let handle = ProjectionRunner::new(Balances, backend(&store, &prefix).await)
        .with_config(config)
        .spawn();
    // Runs until SIGKILL; exits should the test die first (reparented, or two minutes).
    let (parent, started) = (std::os::unix::process::parent_id(), Instant::now());
    while std::os::unix::process::parent_id() == parent
        && started.elapsed() < Duration::from_secs(120)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    handle.abort();
}

fn start_child(schema: &str, prefix: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "kill::redis_runner_child",
            "--nocapture",
            "--quiet",
        ])
        .env(CHILD_SCHEMA, schema)
        .env(CHILD_PREFIX, prefix)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// Two writers append for a few seconds while runner processes (one active, one standby) are
/// SIGKILLed at random moments: afterwards the Redis read model equals a replay of the log, each
/// event applied once, and the event store holds no checkpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_in_redis_across_sigkills() {
    let mut rng = Rng::seeded("exactly_once_in_redis_across_sigkills");
    let schema = format!("redis_kill_{}", uuid::Uuid::now_v7().simple());
    let store = event_store(&schema).await;
    store.migrate().await.unwrap();
    let prefix = crate::fresh_prefix();
    let reader = backend(&store, &prefix).await;
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for b in 0..300 {
                    let account = StreamId::new("account", format!("a{}", (w * 7 + b) % 20));
                    let events = (0..1 + b % 3)
                        .map(|i| NewEvent::from_event(&Deposited { amount: 1 + i }).unwrap())
                        .collect();
                    store
                        .append(&account, ExpectedVersion::Any, events)
                        .await
                        .unwrap();
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
        })
        .collect();
    let mut children = [start_child(&schema, &prefix), start_child(&schema, &prefix)];
    let mut progress = Vec::new();
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(200 + rng.below(400))).await;
        let victim = rng.below(2) as usize;
        children[victim].kill().unwrap(); // SIGKILL
        children[victim].wait().unwrap();
        progress.push(reader.checkpoint("balances").await.unwrap());
        children[victim] = start_child(&schema, &prefix);
    }
    for writer in writers {
        writer.await.unwrap();
    }
    let (expected, last) = replay(&store).await;
    wait_checkpoint(&reader, "balances", last).await;
    for mut child in children {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    eprintln!("checkpoints at the kills: {progress:?}");
    assert_eq!(read_model(&reader).await, expected, "applied exactly once");
    let distinct: std::collections::HashSet<_> = progress.iter().collect();
    assert!(
        distinct.len() > 3,
        "the kills landed while work was done: {progress:?}"
    );
    assert_eq!(store.load_checkpoint("balances").await.unwrap(), None);
    delete_prefix(&reader, &prefix).await;
    let _: &dyn EventStore = &store;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(store.pool())
    .await
    .unwrap();
}
