//! A delivering runner (`ProjectionRunner::delivering`) against an outside system the test
//! controls: batches are handed over ahead of their checkpoints, and the checkpoint never passes
//! a batch the outside system has not acknowledged.
// Tests: failing assertions panic by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cqrs_core::conformance::Added;
use cqrs_core::subscription::{
    FailureCause, InProcess, ProjectionHandle, ProjectionRunner, ProjectionState, RunnerConfig,
};
use cqrs_core::{
    Deliver, Delivery, EventStore, EventTypes, ExpectedVersion, InMemoryStore, NewEvent, Position,
    Projection, ProjectionError, RecordedEvent, StreamId, Subscription,
};
use tokio::sync::watch;

/// Delivers each batch to an outside system that acknowledges the `n`-th hand-over once the
/// test has released `n` (or fails it, for the hand-overs listed in `failing`).
struct Outbox {
    /// Every hand-over, in order: the positions of its events.
    handed: Arc<Mutex<Vec<Vec<Position>>>>,
    released: watch::Receiver<usize>,
    /// Hand-overs (counted from 1) whose delivery fails.
    failing: Vec<usize>,
    /// An event `deliver` refuses (its handler's error), until skipped.
    poison: Option<Position>,
    discards: Arc<AtomicUsize>,
}

impl Projection for Outbox {
    const NAME: &'static str = "outbox";
    const EVENT_TYPES: &'static [&'static str] = &[];
    const SUBSCRIPTION: Subscription = Subscription::ALL;
    type Context = ();

    async fn handle(&mut self, _: &RecordedEvent, _: &mut ()) -> Result<(), ProjectionError> {
        unreachable!("a delivering runner hands batches over instead")
    }

    fn discard(&mut self) {
        self.discards.fetch_add(1, Ordering::SeqCst);
    }
}

impl Deliver for Outbox {
    async fn deliver(&mut self, events: &[RecordedEvent]) -> Result<Delivery, ProjectionError> {
        if let Some(bad) = events.iter().find(|e| Some(e.position) == self.poison) {
            return Err(ProjectionError::Handler {
                projection: "outbox",
                event_type: bad.event_type.clone(),
                position: bad.position,
                source: "refused".into(),
            });
        }
        let number = {
            let mut handed = self.handed.lock().unwrap();
            handed.push(events.iter().map(|e| e.position).collect());
            handed.len()
        };
        let fails = self.failing.contains(&number);
        let mut released = self.released.clone();
        Ok(Box::pin(async move {
            let _ = released.wait_for(|r| *r >= number).await;
            if fails {
                Err(ProjectionError::Unavailable {
                    projection: "outbox",
                    source: "the outside system is down".into(),
                })
            } else {
                Ok(())
            }
        }))
    }
}

struct Setup {
    store: InMemoryStore,
    log: Vec<Position>,
    handed: Arc<Mutex<Vec<Vec<Position>>>>,
    release: watch::Sender<usize>,
    discards: Arc<AtomicUsize>,
    runner: ProjectionHandle<Outbox>,
}

/// 10 events, a delivering runner in batches of 2.
async fn setup(
    released: usize,
    failing: Vec<usize>,
    poison: Option<usize>,
    backoff: Duration,
) -> Setup {
    let store = InMemoryStore::new();
    for n in 0..10 {
        let event = NewEvent::from_event(&Added { n }).unwrap();
        store
            .append(
                &StreamId::new("counter", format!("c{}", n % 3)),
                ExpectedVersion::Any,
                vec![event],
            )
            .await
            .unwrap();
    }
    let log: Vec<Position> = store
        .read_all(Position::START, EventTypes::All, 100)
        .await
        .unwrap()
        .iter()
        .map(|e| e.position)
        .collect();
    let (release, released) = watch::channel(released);
    let handed = Arc::new(Mutex::new(Vec::new()));
    let discards = Arc::new(AtomicUsize::new(0));
    let outbox = Outbox {
        handed: Arc::clone(&handed),
        released,
        failing,
        poison: poison.map(|i| log[i]),
        discards: Arc::clone(&discards),
    };
    let config = RunnerConfig::builder()
        .batch_size(2)
        .poll_interval(Duration::from_millis(20))
        .initial_backoff(backoff)
        .max_backoff(backoff)
        .build()
        .unwrap();
    let runner = ProjectionRunner::new(outbox, InProcess::new(store.clone()))
        .with_config(config)
        .delivering()
        .spawn();
    Setup {
        store,
        log,
        handed,
        release,
        discards,
        runner,
    }
}

async fn until(condition: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    })
    .await
    .expect("the condition holds in time");
}

/// Batches are handed over before the ones before them are acknowledged, and the checkpoint
/// moves only past acknowledged batches: with no acknowledgement it stays at the start however
/// many batches are on their way; with the first one acknowledged it moves past that batch
/// only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_never_passes_an_unacknowledged_batch() {
    let s = setup(0, vec![], None, Duration::from_millis(10)).await;
    let handed = |n: usize| s.handed.lock().unwrap().len() >= n;
    until(|| handed(2)).await;
    assert_eq!(s.runner.status().checkpoint, None, "nothing acknowledged");

    s.release.send_replace(1);
    s.runner
        .wait_for(s.log[1], Duration::from_secs(5))
        .await
        .unwrap();
    // Batch 2 is not acknowledged: the checkpoint cannot move on, however far the runner reads.
    assert_eq!(
        s.runner.status().checkpoint,
        Some(s.log[1]),
        "past the acknowledged batch only"
    );

    s.release.send_replace(usize::MAX);
    let head = s.store.head().await.unwrap().unwrap();
    s.runner
        .wait_for(head, Duration::from_secs(5))
        .await
        .unwrap();
    let handed: Vec<Position> = s.handed.lock().unwrap().concat();
    assert_eq!(handed, s.log, "every event handed over once, in order");
    assert_eq!(s.runner.status().processed, 10);
    s.runner.stop().await;
}

/// A delivery that fails (batch 2's first hand-over): the runner reports the outside system's
/// failure (not skippable), drops what it handed over after it, discards, and hands everything
/// over again from its checkpoint, which never passed batch 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_delivery_goes_back_to_the_checkpoint() {
    let s = setup(usize::MAX, vec![2], None, Duration::from_millis(300)).await;
    let mut status = s.runner.watch_status();
    let failed = tokio::time::timeout(
        Duration::from_secs(5),
        status.wait_for(|s| s.state == ProjectionState::Failed),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    let error = failed.last_error.unwrap();
    assert_eq!(error.cause, FailureCause::Unavailable, "{error:?}");
    assert!(!error.skippable(), "{error:?}");
    assert_eq!(failed.checkpoint, Some(s.log[1]), "batch 1 only");

    let head = s.store.head().await.unwrap().unwrap();
    s.runner
        .wait_for(head, Duration::from_secs(5))
        .await
        .unwrap();
    assert!(s.discards.load(Ordering::SeqCst) >= 1, "discarded");
    let handed = s.handed.lock().unwrap().clone();
    assert_eq!(handed[1], s.log[2..4], "batch 2 handed over, then failed");
    let again = handed
        .iter()
        .skip(2)
        .position(|batch| batch.first() == Some(&s.log[2]))
        .expect("batch 2 handed over again")
        + 2;
    assert_eq!(
        handed[again..].concat(),
        s.log[2..],
        "from the checkpoint on, everything again, in order"
    );
    s.runner.stop().await;
}

/// `deliver` refusing one event (the sixth): the runner hands the events before it over on
/// their own and checkpoints them, stops right before it (skippable there), and a skip moves
/// past it; it is never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_event_stops_right_before_it_and_is_skippable() {
    let s = setup(usize::MAX, vec![], Some(5), Duration::from_millis(50)).await;
    let mut status = s.runner.watch_status();
    let failed = tokio::time::timeout(
        Duration::from_secs(5),
        status.wait_for(|s| s.last_error.is_some()),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    let error = failed.last_error.unwrap();
    assert_eq!(error.cause, FailureCause::Handler, "{error:?}");
    assert_eq!(error.position, Some(s.log[5]));
    assert!(error.skippable());
    assert_eq!(failed.checkpoint, Some(s.log[4]), "right before it");

    s.runner.skip(s.log[5]).await;
    let head = s.store.head().await.unwrap().unwrap();
    s.runner
        .wait_for(head, Duration::from_secs(5))
        .await
        .unwrap();
    let handed: Vec<Position> = s.handed.lock().unwrap().concat();
    let mut expected = s.log.clone();
    expected.remove(5);
    let mut unique = handed.clone();
    unique.dedup();
    assert_eq!(
        unique, expected,
        "everything but the skipped event, in order"
    );
    s.runner.stop().await;
}
