//! The `WATCH` on the checkpoint key: two runners that both passed the checkpoint's compare
//! cannot both commit.

use std::sync::Arc;

use cqrs_core::backend::{BatchError, ProjectionBackend};
use cqrs_core::{
    EventStore, EventTypes, Position, Projection, ProjectionError, RecordedEvent, StoreError,
};
use cqrs_redis::{RedisBatch, RedisProjections};
use tokio::sync::Barrier;

use crate::{backend_over, delete_prefix, redis_url, store_with_deposits};

/// Counts the events it applies in `<prefix>applied`, after waiting for the other runner at the
/// barrier (so both are past the compare before either sends its `EXEC`).
struct Meeting(Arc<Barrier>);

impl Projection for Meeting {
    const NAME: &'static str = "meeting";
    const EVENT_TYPES: &'static [&'static str] = &["Deposited"];
    type Context = RedisBatch;

    async fn handle<'a>(
        &'a mut self,
        _event: &'a RecordedEvent,
        batch: &'a mut RedisBatch,
    ) -> Result<(), ProjectionError> {
        self.0.wait().await;
        let key = batch.key("applied");
        batch.pipeline().incr(key, 1).ignore();
        Ok(())
    }
}

/// Two backends (two runners, e.g. one whose lease expired mid-batch) commit the same batch from
/// the same checkpoint at the same moment: one commits, the other's `EXEC` is refused and
/// reported as a checkpoint conflict; the batch is applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runners_past_the_compare_commit_once() {
    let events = store_with_deposits(1, 1).await;
    let first = backend_over(events.clone()).await;
    let second = RedisProjections::connect(events.clone(), &redis_url())
        .await
        .unwrap()
        .with_key_prefix(first.key_prefix());
    let batch = events
        .read_all(Position::START, EventTypes::All, 10)
        .await
        .unwrap();
    let to = batch[0].position;
    let barrier = Arc::new(Barrier::new(2));
    let (mut a, mut b) = (Meeting(barrier.clone()), Meeting(barrier));
    let (left, right) = tokio::join!(
        first.commit_batch(&mut a, "meeting", None, &batch, to),
        second.commit_batch(&mut b, "meeting", None, &batch, to),
    );
    let conflicts = [&left, &right]
        .iter()
        .filter(|r| {
            matches!(
                r,
                Err(BatchError::Store(StoreError::CheckpointConflict { .. }))
            )
        })
        .count();
    assert!(
        conflicts == 1 && (left.is_ok() || right.is_ok()),
        "one commits, one conflicts: {left:?} {right:?}"
    );
    let mut conn = first.connection().await.unwrap();
    let applied: i64 = redis::cmd("GET")
        .arg(format!("{}applied", first.key_prefix()))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(applied, 1, "the batch applied once");
    assert_eq!(first.checkpoint("meeting").await.unwrap(), Some(to));
    let prefix = first.key_prefix().to_owned();
    delete_prefix(&first, &prefix).await;
}
