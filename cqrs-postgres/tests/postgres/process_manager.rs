//! A process manager (event -> command) on the durable PostgreSQL projection backend: its
//! checkpoint survives restarts, and its commands, issued with `CommandContext::caused_by(event,
//! reaction)`, apply once even when a restarted runner handles an event again (it was killed
//! after the command and before the batch's checkpoint committed).

use std::str::FromStr;
use std::time::{Duration, Instant};

use cqrs_core::conformance::{Add, Counter};
use cqrs_core::subscription::{ProjectionRunner, RunnerConfig};
use cqrs_core::{
    CheckpointStore, CommandContext, EventStore, ExpectedVersion, Position, Projection,
    ProjectionError, RecordedEvent, Repository, StreamId,
};
use cqrs_postgres::{PostgresProjections, PostgresStore};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};

use crate::{drop_schema, event, fresh_store_with, url};

const CHILD_SCHEMA: &str = "CQRS_PM_CHILD_SCHEMA";
/// The aggregate every reaction adds to.
const TARGET: &str = "target";

/// For every `Added` on a `source-*` counter, adds 1 to the counter `target`.
struct Forwarder {
    counters: Repository<Counter>,
}

impl Projection for Forwarder {
    const NAME: &'static str = "forwarder";
    const EVENT_TYPES: &'static [&'static str] = &["Added"];
    type Context = PgConnection;

    async fn handle<'a>(
        &'a mut self,
        event: &'a RecordedEvent,
        _db: &'a mut PgConnection,
    ) -> Result<(), ProjectionError> {
        if !event.stream.id().starts_with("source-") {
            return Ok(());
        }
        let context = CommandContext::caused_by(event, "forward").map_err(|error| {
            ProjectionError::Handler {
                projection: Self::NAME,
                event_type: event.event_type.clone(),
                position: event.position,
                source: Box::new(error),
            }
        })?;
        self.counters
            .execute_in(TARGET, &Add(1), &context)
            .await
            .map_err(|error| ProjectionError::Handler {
                projection: Self::NAME,
                event_type: event.event_type.clone(),
                position: event.position,
                source: Box::new(error),
            })?;
        Ok(())
    }
}

fn config() -> RunnerConfig {
    RunnerConfig::builder()
        .batch_size(25)
        .poll_interval(Duration::from_millis(50))
        .initial_backoff(Duration::from_millis(20))
        .max_backoff(Duration::from_millis(100))
        .standby_interval(Duration::from_millis(50))
        .build()
        .unwrap()
}

/// The process manager's process (started by the test below as this test binary, re-run with
/// `--ignored --exact`). Runs until killed.
#[tokio::test]
#[ignore = "entry point of a child process, started by process_manager_reactions_apply_once_across_sigkills"]
async fn process_manager_child() {
    let schema = std::env::var(CHILD_SCHEMA).expect("started by the kill test");
    let options = PgConnectOptions::from_str(&url()).unwrap();
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .connect_with(options)
        .await
        .unwrap();
    let store = PostgresStore::new(pool).with_schema(&schema).unwrap();
    let forwarder = Forwarder {
        counters: Repository::new(store.clone()),
    };
    let handle = ProjectionRunner::new(forwarder, PostgresProjections::new(store))
        .with_config(config())
        .spawn();
    let parent = std::os::unix::process::parent_id();
    let started = Instant::now();
    while std::os::unix::process::parent_id() == parent
        && started.elapsed() < Duration::from_secs(120)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    handle.abort();
}

fn start_child(schema: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "process_manager::process_manager_child",
            "--nocapture",
            "--quiet",
        ])
        .env(CHILD_SCHEMA, schema)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_manager_reactions_apply_once_across_sigkills() {
    let store = fresh_store_with(6).await;
    let sources = 4;
    let per_source = 150;
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut last = Position::START;
            for i in 0..per_source {
                for s in 0..sources {
                    let stream = StreamId::new("counter", format!("source-{s}"));
                    let written = store
                        .append(&stream, ExpectedVersion::Any, vec![event("Added", 1)])
                        .await
                        .unwrap();
                    last = last.max(written.position);
                }
                if i % 10 == 0 {
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            }
            last
        })
    };
    let mut child = start_child(store.schema());
    let mut progress = Vec::new();
    for _ in 0..8 {
        tokio::time::sleep(Duration::from_millis(
            150 + crate::projections::random() % 350,
        ))
        .await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        progress.push(store.load_checkpoint(Forwarder::NAME).await.unwrap());
        child = start_child(store.schema());
    }
    let last = writer.await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.load_checkpoint(Forwarder::NAME).await.unwrap() < Some(last) {
        assert!(
            Instant::now() < deadline,
            "the process manager never caught up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.kill().unwrap();
    child.wait().unwrap();
    eprintln!("checkpoints at the kills: {progress:?}");
    let target = Repository::<Counter>::new(store.clone())
        .load(TARGET)
        .await
        .unwrap();
    let triggers = (sources * per_source) as i64;
    assert_eq!(
        (target.state.total, target.version.get()),
        (triggers, triggers as u64),
        "every source event caused exactly one addition"
    );
    drop_schema(&store).await;
}
