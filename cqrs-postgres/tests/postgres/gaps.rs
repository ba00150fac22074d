//! Gap-free global reads: an event that takes a low position but commits late is delivered, once,
//! in order, never skipped.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use cqrs_core::{EventStore, EventTypes, ExpectedVersion, Position, StreamId};

use crate::{batch, drop_schema, event, fresh_store};

/// Polls `read_all` from the start until `want` events arrived (or 30 s), like a subscription.
async fn follow(
    store: cqrs_postgres::PostgresStore,
    types: &'static [&'static str],
    want: usize,
) -> Vec<(Position, String)> {
    let filter = if types.is_empty() {
        EventTypes::All
    } else {
        EventTypes::Only(types)
    };
    let mut seen = Vec::new();
    let mut cursor = Position::START;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < want && Instant::now() < deadline {
        let page = store.read_all(cursor, filter, 7).await.unwrap();
        match page.last() {
            Some(last) => cursor = last.position,
            None => tokio::time::sleep(Duration::from_millis(10)).await,
        }
        seen.extend(
            page.into_iter()
                .map(|e| (e.position, e.stream.id().to_owned())),
        );
    }
    seen
}

fn assert_exactly_once_in_order(seen: &[(Position, String)], want: usize) {
    assert_eq!(seen.len(), want, "every event delivered: {seen:?}");
    let unique: HashSet<_> = seen.iter().map(|(p, _)| p).collect();
    assert_eq!(unique.len(), want, "no event delivered twice");
    assert!(
        seen.windows(2).all(|w| w[0].0 < w[1].0),
        "delivered in log order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transaction_held_open_delays_readers_but_nothing_is_skipped() {
    let store = fresh_store().await;
    // Readers that never wait for the horizon: they poll, as a naive subscription would.
    let polling = store.clone().with_horizon_wait(Duration::ZERO);
    let readers = (
        tokio::spawn(follow(polling.clone(), &[], 31)),
        tokio::spawn(follow(polling.clone(), &["Slow"], 1)),
    );

    // A transaction takes a low position and stays open while 30 later appends commit.
    let mut slow = store.pool().begin().await.unwrap();
    let held = store
        .append_in(
            &mut slow,
            &StreamId::new("slow", "s"),
            ExpectedVersion::NoStream,
            vec![event("Slow", 0)],
        )
        .await
        .unwrap();
    let mut fast = Vec::new();
    for i in 0..30 {
        fast.push(
            store
                .append(
                    &StreamId::new("fast", format!("f{}", i % 3)),
                    ExpectedVersion::Any,
                    vec![event("Fast", i)],
                )
                .await
                .unwrap(),
        );
    }
    assert!(
        fast.iter().all(|r| r.position.sequence > held.position.sequence),
        "the premise: the held event has the lowest sequence number, a position-only reader would skip it"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        polling
            .read_all(Position::START, EventTypes::All, 100)
            .await
            .unwrap()
            .is_empty(),
        "nothing may be delivered past the open transaction"
    );
    assert_eq!(
        polling.head().await.unwrap(),
        None,
        "head respects the horizon"
    );
    let horizon = store.horizon().await.unwrap();
    assert_eq!(horizon.waiting_events, 30, "{horizon}");
    assert!(
        horizon.to_string().contains("held back by transaction"),
        "{horizon}"
    );
    assert!(held.position.tx >= horizon.xmin);
    slow.commit().await.unwrap();

    let (all, slow_only) = (readers.0.await.unwrap(), readers.1.await.unwrap());
    assert_exactly_once_in_order(&all, 31);
    assert_eq!(
        all[0].0, held.position,
        "the late commit comes first: it is older"
    );
    assert_eq!(all[30].0, fast[29].position);
    assert_eq!(
        slow_only,
        vec![(held.position, "s".to_owned())],
        "filtered reads too"
    );
    drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_sleeping_before_commit_while_others_commit_are_delivered_exactly_once_in_order() {
    let store = fresh_store().await;
    let polling = store.clone().with_horizon_wait(Duration::ZERO);
    const SLOW: usize = 3;
    const FAST: usize = 60;
    let reader = tokio::spawn(follow(polling, &[], SLOW + FAST * 2));
    // Three transactions each append, then sleep in the database before committing.
    let mut sleepers = Vec::new();
    for i in 0..SLOW {
        let store = store.clone();
        sleepers.push(tokio::spawn(async move {
            let mut tx = store.pool().begin().await.unwrap();
            let written = store
                .append_in(
                    &mut tx,
                    &StreamId::new("sleeper", i.to_string()),
                    ExpectedVersion::NoStream,
                    batch(1),
                )
                .await
                .unwrap();
            sqlx::query("SELECT pg_sleep(0.4)")
                .execute(&mut *tx)
                .await
                .unwrap();
            tx.commit().await.unwrap();
            written
        }));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Meanwhile two writers commit later positions, fast.
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..FAST {
                    store
                        .append(
                            &StreamId::new("fast", w.to_string()),
                            ExpectedVersion::Any,
                            batch(1),
                        )
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    let mut slow = Vec::new();
    for sleeper in sleepers {
        slow.push(sleeper.await.unwrap());
    }
    let seen = reader.await.unwrap();
    assert_exactly_once_in_order(&seen, SLOW + FAST * 2);
    let stored: Vec<Position> = futures_util::TryStreamExt::try_collect::<Vec<_>>(
        cqrs_core::store::read_all_batched(&store, Position::START, EventTypes::All, 50),
    )
    .await
    .unwrap()
    .into_iter()
    .map(|e| e.position)
    .collect();
    assert_eq!(
        seen.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
        stored,
        "the follower saw the log, in the log's order"
    );
    for written in slow {
        assert!(
            stored.contains(&written.position),
            "a late commit was skipped"
        );
    }
    drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_short_read_waits_for_in_flight_transactions_below_committed_events() {
    let store = fresh_store().await;
    let mut slow = store.pool().begin().await.unwrap();
    store
        .append_in(
            &mut slow,
            &StreamId::new("slow", "s"),
            ExpectedVersion::NoStream,
            batch(1),
        )
        .await
        .unwrap();
    store
        .append(
            &StreamId::new("fast", "f"),
            ExpectedVersion::NoStream,
            batch(1),
        )
        .await
        .unwrap();
    let committer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        slow.commit().await.unwrap();
    });
    // The default store waits (up to its horizon wait) instead of returning a short page.
    let started = Instant::now();
    let read = store
        .read_all(Position::START, EventTypes::All, 10)
        .await
        .unwrap();
    assert_eq!(read.len(), 2, "the read waited for the open transaction");
    assert!(started.elapsed() >= Duration::from_millis(250));
    committer.await.unwrap();
    // With a bound shorter than the transaction, it returns what is below the horizon.
    let mut slow = store.pool().begin().await.unwrap();
    store
        .append_in(
            &mut slow,
            &StreamId::new("slow", "t"),
            ExpectedVersion::NoStream,
            batch(1),
        )
        .await
        .unwrap();
    store
        .append(
            &StreamId::new("fast", "f"),
            ExpectedVersion::Exact(cqrs_core::StreamVersion::new(1)),
            batch(1),
        )
        .await
        .unwrap();
    let impatient = store.clone().with_horizon_wait(Duration::from_millis(50));
    let read = impatient
        .read_all(read[1].position, EventTypes::All, 10)
        .await
        .unwrap();
    assert!(read.is_empty(), "{read:?}");
    slow.rollback().await.unwrap();
    let read = impatient
        .read_all(Position::START, EventTypes::All, 10)
        .await
        .unwrap();
    assert_eq!(read.len(), 3, "the rolled-back append is not there");
    drop_schema(&store).await;
}
