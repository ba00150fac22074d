//! Several processes on one file: a writer killed mid-batch, two writers racing.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use cqrs_core::store::read_all_batched;
use cqrs_core::{
    EventId, EventStore, EventTypes, ExpectedVersion, NewEvent, Position, StoreError, StreamId,
    StreamVersion,
};
use cqrs_sqlite::SqliteStore;
use futures_util::TryStreamExt;
use serde_json::json;

use crate::{child_db, parent_alive, start_child, Rng, TempDir};

const BATCH: usize = 20;

fn batch(n: usize) -> Vec<NewEvent> {
    (0..n)
        .map(|i| NewEvent {
            event_id: EventId::new(),
            event_type: "Numbered".into(),
            schema_version: 1,
            payload: json!({ "i": i, "pad": "x".repeat(200) }),
            metadata: Default::default(),
        })
        .collect()
}

/// Not a test: a writer process for `kill_9_mid_batch_tears_no_batch_and_loses_no_ack`. Four
/// tasks append batches of `BATCH` events to their own streams (so groups of several appends
/// commit together) and print `ACK <stream> <version>` after each success, until killed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "entry point of a child process"]
async fn writer_child() {
    let store = SqliteStore::open(child_db()).await.unwrap();
    let (parent, started) = (std::os::unix::process::parent_id(), Instant::now());
    let mut tasks = Vec::new();
    for task in 0..4 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new("writer", format!("{}-{task}", std::process::id()));
            let mut version = StreamVersion::INITIAL;
            while parent_alive(parent, started) {
                let written = store
                    .append(&stream, ExpectedVersion::Exact(version), batch(BATCH))
                    .await
                    .unwrap();
                version = written.stream_version;
                println!("ACK {} {}", stream.id(), version.get());
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

async fn everything(store: &SqliteStore) -> Vec<cqrs_core::RecordedEvent> {
    read_all_batched(store, Position::START, EventTypes::All, 500)
        .try_collect()
        .await
        .unwrap()
}

/// SIGKILL a process in the middle of appending (several times, at random moments): after
/// reopening, every batch is there whole or not at all, every append the process acknowledged is
/// there, versions are dense and positions have no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_tears_no_batch_and_loses_no_ack() {
    let mut rng = Rng::seeded("kill_9_mid_batch_tears_no_batch_and_loses_no_ack");
    let dir = TempDir::new();
    // Created (and migrated) once here, so the kills land in appends, not in the migration.
    drop(SqliteStore::open(dir.db()).await.unwrap());
    let mut acked: Vec<(String, u64)> = Vec::new();
    for round in 0..3 {
        let mut child = start_child("processes::writer_child", &dir.db(), &[]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.lines("ACK ").len() < 5 {
            assert!(Instant::now() < deadline, "the writer child never appended");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.below(150))).await;
        child.kill();
        let lines = child.lines("ACK ");
        eprintln!(
            "round {round}: killed after {} acknowledged appends",
            lines.len()
        );
        for line in lines {
            let mut parts = line.split_whitespace().skip(1);
            let stream = parts.next().unwrap().to_owned();
            let version = parts.next().unwrap().parse().unwrap();
            acked.push((stream, version));
        }
    }
    let store = SqliteStore::open(dir.db()).await.unwrap();
    let all = everything(&store).await;
    let keys: Vec<u64> = all.iter().map(|e| e.position.sequence).collect();
    let dense: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(keys, dense, "positions have a gap");
    let mut versions: HashMap<String, Vec<u64>> = HashMap::new();
    for event in &all {
        versions
            .entry(event.stream.id().to_owned())
            .or_default()
            .push(event.stream_version.get());
    }
    for (stream, versions) in &versions {
        let dense: Vec<u64> = (1..=versions.len() as u64).collect();
        assert_eq!(versions, &dense, "versions of {stream} are not dense");
        assert_eq!(versions.len() % BATCH, 0, "a torn batch on {stream}");
    }
    for (stream, version) in &acked {
        let stored = versions.get(stream).map_or(0, Vec::len) as u64;
        assert!(stored >= *version, "acknowledged {stream}@{version} lost");
    }
    assert!(!acked.is_empty());
}

/// Not a test: one of the two racing processes of `two_processes_race_one_stream`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "entry point of a child process"]
async fn racer_child() {
    let db = child_db();
    let store = SqliteStore::open(&db).await.unwrap();
    let go = db.with_extension("go");
    let (parent, started) = (std::os::unix::process::parent_id(), Instant::now());
    while !go.exists() && parent_alive(parent, started) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let me = std::process::id();
    for round in 0..RACES {
        let stream = StreamId::new("race", format!("r-{round}"));
        let mut event = batch(1);
        event[0].payload = json!({ "by": me });
        match store
            .append(&stream, ExpectedVersion::NoStream, event)
            .await
        {
            Ok(_) => println!("WON {round}"),
            Err(StoreError::Concurrency(_)) => println!("LOST {round}"),
            Err(other) => panic!("round {round}: {other}"),
        }
        // Then a contended stream, with the usual read-expect-retry loop.
        let shared = StreamId::new("race", "shared");
        loop {
            let version = store.stream_version(&shared).await.unwrap();
            match store
                .append(&shared, ExpectedVersion::Exact(version), batch(2))
                .await
            {
                Ok(_) => break,
                Err(StoreError::Concurrency(_)) => tokio::task::yield_now().await,
                Err(other) => panic!("shared stream: {other}"),
            }
        }
    }
}

const RACES: usize = 25;

/// Two processes append to the same streams at the same moments: each `NoStream` race has
/// exactly one winner and one typed conflict, the contended stream loses nothing, and no
/// "database is locked" surfaces (a child would panic).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_race_one_stream() {
    let dir = TempDir::new();
    let store = SqliteStore::open(dir.db()).await.unwrap();
    let mut children = [
        start_child("processes::racer_child", &dir.db(), &[]),
        start_child("processes::racer_child", &dir.db(), &[]),
    ];
    // Both have opened the store once they are waiting; give them a moment, then start both.
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(dir.db().with_extension("go"), b"").unwrap();
    for child in &mut children {
        child.wait_success();
    }
    let mut winners: BTreeMap<usize, usize> = BTreeMap::new();
    for child in &children {
        for line in child.lines("WON ") {
            *winners.entry(line[4..].parse().unwrap()).or_default() += 1;
        }
        assert_eq!(
            child.lines("WON ").len() + child.lines("LOST ").len(),
            RACES
        );
    }
    assert_eq!(winners.len(), RACES, "a race without a winner: {winners:?}");
    assert!(
        winners.values().all(|&n| n == 1),
        "two winners: {winners:?}"
    );
    for round in 0..RACES {
        let stream = StreamId::new("race", format!("r-{round}"));
        assert_eq!(store.stream_version(&stream).await.unwrap().get(), 1);
    }
    let shared = StreamId::new("race", "shared");
    assert_eq!(
        store.stream_version(&shared).await.unwrap().get(),
        (2 * RACES * 2) as u64,
        "the contended stream lost appends"
    );
}
