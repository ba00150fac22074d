//! Grouped loads: concurrent replays of different streams (commands' loads) are read in one
//! statement, and every caller still gets exactly the events or the error its own read gives.

use std::collections::HashMap;
use std::time::Duration;

use cqrs_core::{EventStore, ExpectedVersion, ReplayEvent, StoreError, StreamId, StreamVersion};
use cqrs_postgres::PostgresStore;

use crate::{batch, drop_schema, fresh_store_with, histogram_samples, insert_raw};

/// Eight streams of 0 to 7 events, and eight loads of them that differ in where they start and
/// how many events they take.
async fn streams_and_loads(store: &PostgresStore) -> Vec<(StreamId, StreamVersion, usize)> {
    let mut loads = Vec::new();
    for i in 0..8_u64 {
        let stream = StreamId::new("account", format!("load{i}"));
        if i > 0 {
            store
                .append(&stream, ExpectedVersion::NoStream, batch(i as usize))
                .await
                .unwrap();
        }
        let (from, limit) = match i {
            3 => (StreamVersion::new(2), 1000),
            5 => (StreamVersion::new(1), 2),
            6 => (StreamVersion::new(9), 1000),
            _ => (StreamVersion::new(1), 1000),
        };
        loads.push((stream, from, limit));
    }
    loads
}

/// `loads` as tasks, all runnable at once.
fn spawn_loads(
    store: &PostgresStore,
    loads: &[(StreamId, StreamVersion, usize)],
) -> Vec<tokio::task::JoinHandle<Result<Vec<ReplayEvent>, StoreError>>> {
    loads
        .iter()
        .cloned()
        .map(|(stream, from, limit)| {
            let store = store.clone();
            tokio::spawn(async move { store.read_stream_for_replay(&stream, from, limit).await })
        })
        .collect()
}

/// Runs `loads` as tasks that are all runnable at once, and returns their results in order.
async fn runnable_loads(
    store: &PostgresStore,
    loads: &[(StreamId, StreamVersion, usize)],
) -> Vec<Result<Vec<ReplayEvent>, StoreError>> {
    let tasks = spawn_loads(store, loads);
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

/// The sizes the load-group histogram recorded since the last call.
fn load_groups(snapshotter: &metrics_util::debugging::Snapshotter) -> Vec<usize> {
    histogram_samples(snapshotter, cqrs_core::metrics::LOAD_GROUP_SIZE)
        .into_iter()
        .map(|size| size as usize)
        .collect()
}

/// Eight loads runnable at once. A load that finds no read in flight reads alone unless loads
/// came together last time: then it first lets the runnable ones join, and all eight are read in
/// one statement. Whether the first bursts come together depends on I/O timing (a load whose
/// reply is already there when it reads completes in its first poll, before the next task runs),
/// so bursts repeat until one is a single group; from then on each is. Every burst's loads are
/// all accounted for, and each returns what the same read returns on a store without group
/// commit (no grouping): its own stream, from its own version, up to its own limit.
#[tokio::test(flavor = "current_thread")]
async fn loads_that_run_together_are_read_in_one_statement_each_with_its_own_events() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let store = fresh_store_with(8).await;
    let loads = streams_and_loads(&store).await;
    let alone = store.clone().without_group_commit();
    let mut expected = Vec::new();
    for (stream, from, limit) in &loads {
        expected.push(
            alone
                .read_stream_for_replay(stream, *from, *limit)
                .await
                .unwrap(),
        );
    }
    assert_eq!(expected[3].len(), 2, "from version 2 of 3 events");
    assert_eq!(expected[5].len(), 2, "2 of 5 events");
    assert!(expected[6].is_empty() && expected[0].is_empty());
    load_groups(&snapshotter);

    let mut one_statement = 0;
    for burst in 0..20 {
        let results = runnable_loads(&store, &loads).await;
        let groups = load_groups(&snapshotter);
        assert_eq!(groups.iter().sum::<usize>(), 8, "burst {burst}: {groups:?}");
        let results: Vec<_> = results.into_iter().map(Result::unwrap).collect();
        assert_eq!(results, expected, "burst {burst}");
        if groups == [8] {
            one_statement += 1;
            if one_statement == 2 {
                break;
            }
        } else {
            assert_eq!(
                one_statement, 0,
                "burst {burst} after a single group: {groups:?}"
            );
        }
    }
    assert_eq!(
        one_statement, 2,
        "no burst of runnable loads was read in one statement"
    );
    drop_schema(&store).await;
}

/// A stream with an unreadable row, in a group: its load gets the error its own read gives (the
/// row's position named), and the others their events.
#[tokio::test(flavor = "current_thread")]
async fn an_unreadable_stream_in_a_group_gets_its_own_error() {
    let store = fresh_store_with(8).await;
    let mut loads = streams_and_loads(&store).await;
    let bad = StreamId::new("account", "unreadable");
    // A negative schema version: no event can carry it.
    let position = insert_raw(&store, "account", "unreadable", 1, "Added", -1, "{}", "{}").await;
    loads.insert(2, (bad.clone(), StreamVersion::new(1), 1000));
    let alone = store.clone().without_group_commit();
    let own = alone
        .read_stream_for_replay(&bad, StreamVersion::new(1), 1000)
        .await
        .unwrap_err();
    assert!(own.to_string().contains(&position.to_string()), "{own}");
    // Twice: the second burst is one group.
    for _ in 0..2 {
        let results = runnable_loads(&store, &loads).await;
        for ((stream, from, limit), result) in loads.iter().zip(results) {
            if *stream == bad {
                assert_eq!(result.unwrap_err().to_string(), own.to_string());
            } else {
                let events = alone.read_stream_for_replay(stream, *from, *limit).await;
                assert_eq!(result.unwrap(), events.unwrap());
            }
        }
    }
    drop_schema(&store).await;
}

/// A load that leads (or is told to lead) and is cancelled hands the queue on: the loads queued
/// behind it still get their events, read by the next one that is still waiting.
#[tokio::test(flavor = "current_thread")]
async fn cancelled_loads_leave_the_queue_to_the_next_one() {
    let store = fresh_store_with(8).await;
    let loads = streams_and_loads(&store).await;
    let alone = store.clone().without_group_commit();
    let mut expected = HashMap::new();
    for (stream, from, limit) in &loads {
        let events = alone.read_stream_for_replay(stream, *from, *limit).await;
        expected.insert(stream.clone(), events.unwrap());
    }
    let tasks = spawn_loads(&store, &loads);
    // Every load is at its first await, as a rule: the first reading, the rest queued behind it
    // (on a loaded machine the first may already be done). Cancel the reader and the first in
    // the queue (the one it would tell to lead next); whatever the timing, the others must get
    // their events.
    tokio::task::yield_now().await;
    tasks[0].abort();
    tasks[1].abort();
    for ((stream, ..), task) in loads.iter().zip(tasks).skip(2) {
        // A queue that nobody leads would wait forever.
        let loaded = tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .expect("a queued load was left without a leader");
        assert_eq!(&loaded.unwrap().unwrap(), &expected[stream]);
    }
    // The committer is free again: a lone load is read (alone) at once.
    let (stream, from, limit) = &loads[7];
    assert_eq!(
        &store
            .read_stream_for_replay(stream, *from, *limit)
            .await
            .unwrap(),
        &expected[stream]
    );
    drop_schema(&store).await;
}
