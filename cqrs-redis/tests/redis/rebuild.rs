//! Losing the data loses the checkpoint with it: the runner rebuilds from the start by itself.

use std::sync::Arc;
use std::time::Duration;

use cqrs_core::prelude::*;
use cqrs_core::subscription::{ProjectionRunner, RunnerConfig};
use cqrs_core::{EventStore, NewEvent};

use crate::{
    backend_over, delete_prefix, read_model, replay, store_with_deposits, wait_checkpoint,
    Balances, Deposited,
};

fn config() -> RunnerConfig {
    RunnerConfig::builder()
        .batch_size(50)
        .poll_interval(Duration::from_millis(50))
        .initial_backoff(Duration::from_millis(10))
        .max_backoff(Duration::from_millis(100))
        .standby_interval(Duration::from_millis(20))
        .build()
        .unwrap()
}

/// A live runner whose keys (read model, checkpoint, lease) vanish at once, as in a `FLUSHDB` or
/// a restart without persistence, rebuilds the read model from the start without a new event
/// arriving, and applies later events once: never a read model resumed on nothing, never one
/// applied twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_data_rebuilds_the_read_model_from_the_start() {
    let events = store_with_deposits(300, 7).await;
    let backend = backend_over(events.clone()).await;
    let handle = ProjectionRunner::new(Balances, backend.clone())
        .with_config(config())
        .spawn();
    let (expected, last) = replay(&*events).await;
    wait_checkpoint(&backend, "balances", last).await;
    assert_eq!(read_model(&backend).await, expected);

    let prefix = backend.key_prefix().to_owned();
    delete_prefix(&backend, &prefix).await;
    // No new event: the runner notices through its lease and replays everything.
    wait_checkpoint(&backend, "balances", last).await;
    assert_eq!(read_model(&backend).await, expected, "rebuilt, not resumed");

    let account = StreamId::new("account", "late");
    let late = NewEvent::from_event(&Deposited { amount: 5 }).unwrap();
    let written = events
        .append(&account, ExpectedVersion::Any, vec![late])
        .await
        .unwrap();
    wait_checkpoint(&backend, "balances", written.position).await;
    let (expected, _) = replay(&*events).await;
    assert_eq!(read_model(&backend).await, expected);
    handle.stop().await.unwrap();
    delete_prefix(&backend, &prefix).await;
}

/// The event store is only read: a catch-up leaves its checkpoints untouched, the checkpoint is
/// in Redis beside the read model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_lives_in_redis_not_in_the_event_store() {
    let events = store_with_deposits(20, 3).await;
    let backend = backend_over(events.clone()).await;
    ProjectionRunner::new(Balances, backend.clone())
        .with_config(config())
        .catch_up()
        .await
        .unwrap();
    let (expected, last) = replay(&*events).await;
    assert_eq!(backend.checkpoint("balances").await.unwrap(), Some(last));
    assert_eq!(read_model(&backend).await, expected);
    use cqrs_core::CheckpointStore;
    assert_eq!(events.load_checkpoint("balances").await.unwrap(), None);
    let prefix = backend.key_prefix().to_owned();
    delete_prefix(&backend, &prefix).await;
    let _: Arc<dyn EventStore> = events;
}
