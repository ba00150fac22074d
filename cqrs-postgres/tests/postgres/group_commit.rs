//! Group commit: concurrent appends to different streams share one statement and one commit, and
//! every caller still gets exactly its own result or its own error.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use cqrs_core::{
    AppendResult, EventId, EventStore, EventTypes, ExpectedVersion, Position, StoreError, StreamId,
    StreamVersion,
};
use cqrs_postgres::{GroupCommit, PostgresStore};
use sqlx::Connection;

use crate::{batch, drop_schema, fresh_store_with};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grouped_appends_give_every_caller_its_own_result_and_its_own_conflict() {
    const TASKS: usize = 24;
    const APPENDS: usize = 40;
    let store = fresh_store_with(6).await.with_group_commit(
        GroupCommit::default()
            .with_max_batch(16)
            .with_max_wait(Duration::from_millis(2)),
    );
    // Each task owns a stream. Every fifth append expects a wrong version (a conflict that must
    // stay its own), every seventh re-sends its previous batch (a retry, that must return the
    // original result, without failing the others in its group).
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new("account", format!("g{t}"));
            let mut version = StreamVersion::INITIAL;
            let mut written: Vec<(Vec<EventId>, AppendResult)> = Vec::new();
            let mut previous: Option<(Vec<cqrs_core::NewEvent>, AppendResult)> = None;
            let mut conflicts = 0;
            for i in 0..APPENDS {
                if i % 5 == 4 {
                    let wrong = ExpectedVersion::Exact(version.advance(3));
                    match store.append(&stream, wrong, batch(2)).await {
                        Err(StoreError::Concurrency(c)) => {
                            assert_eq!(c.actual, version, "the conflict reports this stream");
                            assert_eq!(c.expected, wrong);
                            conflicts += 1;
                        }
                        other => panic!("expected a conflict, got {other:?}"),
                    }
                    continue;
                }
                if i % 7 == 6 {
                    let (events, original) = previous.clone().unwrap();
                    let again = store
                        .append(&stream, ExpectedVersion::Any, events)
                        .await
                        .unwrap();
                    assert_eq!(again, original, "a retry returns the original result");
                    continue;
                }
                let events = batch(1 + i % 3);
                let expected = if i % 2 == 0 {
                    ExpectedVersion::Exact(version)
                } else {
                    ExpectedVersion::Any
                };
                let result = store
                    .append(&stream, expected, events.clone())
                    .await
                    .unwrap();
                assert_eq!(result.stream_version, version.advance(events.len() as u64));
                version = result.stream_version;
                written.push((events.iter().map(|e| e.event_id).collect(), result));
                previous = Some((events, result));
            }
            (stream, written, conflicts)
        }));
    }
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    let all: Vec<_> = futures_util::TryStreamExt::try_collect::<Vec<_>>(
        cqrs_core::store::read_all_batched(&store, Position::START, EventTypes::All, 500),
    )
    .await
    .unwrap();
    let by_id: HashMap<EventId, &cqrs_core::RecordedEvent> =
        all.iter().map(|e| (e.event_id, e)).collect();
    let mut appends = 0;
    for (stream, written, conflicts) in &results {
        assert_eq!(*conflicts, APPENDS / 5);
        let mut expected_version = 0;
        for (ids, result) in written {
            appends += 1;
            let stored: Vec<_> = ids.iter().map(|id| by_id[id]).collect();
            for e in &stored {
                expected_version += 1;
                assert_eq!(&e.stream, stream);
                assert_eq!(e.stream_version.get(), expected_version, "dense, in order");
            }
            let last = stored.last().unwrap();
            assert_eq!(
                (last.stream_version, last.position),
                (result.stream_version, result.position),
                "the result names exactly where the batch landed"
            );
        }
        assert_eq!(
            store.stream_version(stream).await.unwrap().get(),
            expected_version
        );
    }
    let stored_ids: HashSet<EventId> = all.iter().map(|e| e.event_id).collect();
    assert_eq!(stored_ids.len(), all.len(), "nothing duplicated");
    assert_eq!(
        all.len(),
        by_id.len(),
        "nothing written beyond what the callers were told"
    );
    assert_eq!(
        all.len(),
        results
            .iter()
            .flat_map(|r| &r.1)
            .map(|(ids, _)| ids.len())
            .sum::<usize>()
    );
    // Grouping happened: fewer transactions than appends, some holding several streams.
    let mut streams_per_tx: HashMap<u64, HashSet<&StreamId>> = HashMap::new();
    for e in &all {
        streams_per_tx
            .entry(e.position.tx)
            .or_default()
            .insert(&e.stream);
    }
    let grouped = streams_per_tx.values().filter(|s| s.len() > 1).count();
    let largest = streams_per_tx.values().map(HashSet::len).max().unwrap_or(0);
    eprintln!(
        "group commit: {appends} appends in {} transactions; {grouped} held several streams, the largest {largest}",
        streams_per_tx.len()
    );
    assert!(grouped > 0, "no two appends were ever committed together");
    assert!(streams_per_tx.len() < appends);
    drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grouped_and_individual_writers_race_on_one_stream_without_loss() {
    let grouped = fresh_store_with(6).await;
    let store = grouped.clone().without_group_commit();
    let stream = StreamId::new("hot", "1");
    let mut tasks = Vec::new();
    for t in 0..8 {
        let store = if t % 2 == 0 {
            grouped.clone()
        } else {
            store.clone()
        };
        let stream = stream.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for _ in 0..40 {
                let events = batch(3);
                loop {
                    let at = store.stream_version(&stream).await.unwrap();
                    match store
                        .append(&stream, ExpectedVersion::Exact(at), events.clone())
                        .await
                    {
                        Ok(_) => break,
                        Err(StoreError::Concurrency(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                ids.extend(events.iter().map(|e| e.event_id));
            }
            ids
        }));
    }
    let mut sent = HashSet::new();
    for task in tasks {
        sent.extend(task.await.unwrap());
    }
    let all = store
        .read_stream(&stream, StreamVersion::new(1), 10_000)
        .await
        .unwrap();
    assert_eq!(all.len(), 8 * 40 * 3);
    assert_eq!(all.iter().map(|e| e.event_id).collect::<HashSet<_>>(), sent);
    assert!(all
        .iter()
        .enumerate()
        .all(|(i, e)| e.stream_version.get() == i as u64 + 1));
    drop_schema(&store).await;
}

/// With the default settings (no waiting) appends that arrive while the in-flight slots are busy
/// share the next group. Until group commit held a slot for an append written alone, a lone
/// leader wrote its group of one individually and freed the slot at once, so with the defaults
/// no two appends were ever grouped.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_default_settings_group_concurrent_appends() {
    const TASKS: usize = 8;
    const APPENDS: usize = 30;
    let store = fresh_store_with(TASKS as u32)
        .await
        .with_group_commit(GroupCommit::default());
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new("account", format!("d{t}"));
            let mut version = StreamVersion::INITIAL;
            for _ in 0..APPENDS {
                let written = store
                    .append(&stream, ExpectedVersion::Exact(version), batch(1))
                    .await
                    .unwrap();
                assert_eq!(written.stream_version, version.next());
                version = written.stream_version;
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let all: Vec<_> = futures_util::TryStreamExt::try_collect::<Vec<_>>(
        cqrs_core::store::read_all_batched(&store, Position::START, EventTypes::All, 500),
    )
    .await
    .unwrap();
    assert_eq!(all.len(), TASKS * APPENDS);
    let transactions: HashSet<u64> = all.iter().map(|e| e.position.tx).collect();
    eprintln!(
        "default group commit: {} appends in {} transactions",
        all.len(),
        transactions.len()
    );
    // Eight writers, one write in flight: most appends wait for the slot and go in a
    // group. A fifth fewer transactions than appends is far below what grouping gives (about 7
    // appends per transaction here) and far above what a run without grouping can reach (none).
    assert!(
        transactions.len() * 5 < all.len() * 4,
        "{} appends took {} transactions: hardly grouped",
        all.len(),
        transactions.len()
    );
    drop_schema(&store).await;
}

/// Under load (the last group took more than one append) a leader yields before it takes its
/// group, so appends from tasks that are already runnable join it instead of waiting for the
/// next one. On a single-threaded runtime the order is fixed. A first burst of eight runnable
/// appends finds the committer idle: its first append is written alone at once (a lone client
/// never yields) and the seven others share the next group. In the second burst the first task
/// takes the slot and yields, the other seven queue, and the leader takes all eight. Without the
/// yield the first would write alone again, and the seven would share a second commit. With two
/// slots the second task leads too, yields, and finds the queue taken.
#[tokio::test(flavor = "current_thread")]
async fn appends_already_runnable_join_the_leaders_group() {
    for slots in [1, 2] {
        let config = GroupCommit::default().with_max_in_flight(slots);
        let store = fresh_store_with(8).await.with_group_commit(config);
        let first = commits_of_runnable_appends(&store, "first").await;
        assert!(
            first <= 2,
            "{slots} slot(s): a first burst took {first} commits"
        );
        let second = commits_of_runnable_appends(&store, "second").await;
        assert_eq!(
            second, 1,
            "{slots} slot(s): 8 appends runnable at once under load took {second} commits"
        );
        drop_schema(&store).await;
    }
}

/// A writer that appends again the moment its grouped append returns (a client's next command
/// on its own stream) joins the queue for the next group: its stream no longer counts as being
/// written once its reply is out. Were it still counted, the append would take the hot-stream
/// path and be written alone, outside every group, which only a multi-threaded runtime shows
/// (the caller's task resumes on another worker while the leader is still replying to the
/// rest). Every append taken from the queue is counted in the group-size histogram, so the
/// histogram's sum is the number of appends that went through the queue: all of them.
#[test]
fn a_writer_appending_again_after_its_reply_joins_the_queue() {
    const WRITERS: usize = 8;
    const APPENDS: usize = 40;
    // The metrics of every worker thread go to one recorder; `metrics` keeps a local recorder per
    // thread, set here for the runtime's threads as each starts.
    let recorder: &'static _ =
        Box::leak(Box::new(metrics_util::debugging::DebuggingRecorder::new()));
    let snapshotter = recorder.snapshotter();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || std::mem::forget(metrics::set_default_local_recorder(recorder)))
        .build()
        .unwrap();
    runtime.block_on(async {
        let store = fresh_store_with(8).await;
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    let stream = StreamId::new("account", format!("again{w}"));
                    for i in 0..APPENDS {
                        let expected = ExpectedVersion::Exact(StreamVersion::new(i as u64));
                        store.append(&stream, expected, batch(1)).await.unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.await.unwrap();
        }
        drop_schema(&store).await;
    });
    let queued: f64 = crate::histogram_samples(&snapshotter, cqrs_core::metrics::GROUP_COMMIT_SIZE)
        .iter()
        .sum();
    assert_eq!(
        queued as usize,
        WRITERS * APPENDS,
        "appends that went through the group-commit queue"
    );
}

/// Under load a group's statement carries the notification, as a lone append's does: announcing
/// costs no `NOTIFY` of its own and no extra round trip. Each burst of eight runnable appends
/// after the first is one group (see `appends_already_runnable_join_the_leaders_group`), and
/// comes more than the announcer's interval after the last notification, so it claims the next
/// one. Only the first burst may leave a trailing notification to the background task (its
/// first append, written alone, may have carried one just before its group).
#[tokio::test(flavor = "current_thread")]
async fn a_group_carries_the_notification_in_its_own_statement() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    // This runtime's one thread runs every task of the store: they all record here.
    let _recording = metrics::set_default_local_recorder(&recorder);
    let (store, mut listener) = listened_store_after_a_first_burst().await;
    const BURSTS: u64 = 5;
    for burst in 0..BURSTS {
        let commits = commits_of_runnable_appends(&store, &format!("burst{burst}")).await;
        assert_eq!(commits, 1, "burst {burst} was not one group");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let carried = notifications_by_carrier(&snapshotter);
    assert!(
        carried.get("group").copied().unwrap_or(0) >= BURSTS,
        "notifications by carrier: {carried:?}"
    );
    assert!(
        carried.get("background").copied().unwrap_or(0) <= 1,
        "notifications by carrier: {carried:?}"
    );
    // Listeners got them, the last naming the newest event.
    let heard = heard_until_quiet(&mut listener).await;
    assert!(heard.len() as u64 > BURSTS, "heard only {heard:?}");
    assert_eq!(heard.last(), Some(&newest(&store).await), "heard {heard:?}");
    drop_schema(&store).await;
}

/// A group claims the notification for its last event, so if that event's append is refused the
/// statement notifies nothing: the group must then leave its appends to the background task
/// (not count them as announced), and listeners still hear of them.
#[tokio::test(flavor = "current_thread")]
async fn a_group_whose_last_append_is_refused_leaves_the_notification_to_the_background() {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _recording = metrics::set_default_local_recorder(&recorder);
    let (store, mut listener) = listened_store_after_a_first_burst().await;
    heard_until_quiet(&mut listener).await;
    notifications_by_carrier(&snapshotter);
    // One group of eight (as in the test above) whose last append expects a version its new
    // stream does not have.
    let results = runnable_appends(
        &store,
        "refused",
        ExpectedVersion::Exact(StreamVersion::new(5)),
    )
    .await;
    let (last, written) = results.split_last().unwrap();
    assert!(matches!(last, Err(StoreError::Concurrency(_))), "{last:?}");
    let transactions: HashSet<_> = written
        .iter()
        .map(|r| r.as_ref().unwrap().position.tx)
        .collect();
    assert_eq!(transactions.len(), 1, "the seven were not one group");
    let heard = heard_until_quiet(&mut listener).await;
    let carried = notifications_by_carrier(&snapshotter);
    assert_eq!(carried.get("group").copied().unwrap_or(0), 0, "{carried:?}");
    assert_eq!(carried.get("background").copied(), Some(1), "{carried:?}");
    assert_eq!(heard.last(), Some(&newest(&store).await), "heard {heard:?}");
    drop_schema(&store).await;
}

/// A fresh store with a listener, after a first burst of eight runnable appends and a pause of
/// several announcer intervals: the next burst is one group, and it may claim the notification.
async fn listened_store_after_a_first_burst() -> (PostgresStore, cqrs_postgres::AppendListener) {
    let store = fresh_store_with(8).await;
    let listener = store.listen().await.unwrap();
    commits_of_runnable_appends(&store, "first").await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    (store, listener)
}

/// `cqrs_notifications_total` by `carried_by`, as recorded since the last call (a snapshot takes
/// the counters' values).
fn notifications_by_carrier(
    snapshotter: &metrics_util::debugging::Snapshotter,
) -> HashMap<String, u64> {
    let mut carried = HashMap::new();
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if key.key().name() != cqrs_core::metrics::NOTIFICATIONS {
            continue;
        }
        let by = key.key().labels().find(|l| l.key() == "carried_by");
        if let (Some(by), metrics_util::debugging::DebugValue::Counter(n)) = (by, value) {
            carried.insert(by.value().to_owned(), n);
        }
    }
    carried
}

/// The positions `listener` hears until it has heard nothing for 200 ms.
async fn heard_until_quiet(listener: &mut cqrs_postgres::AppendListener) -> Vec<Position> {
    let mut heard = Vec::new();
    while let Ok(notified) = tokio::time::timeout(Duration::from_millis(200), listener.recv()).await
    {
        heard.push(notified.unwrap().unwrap());
    }
    heard
}

/// The position of the newest stored event.
async fn newest(store: &PostgresStore) -> Position {
    let stored = store
        .read_all(Position::START, EventTypes::All, 1000)
        .await
        .unwrap();
    stored.last().unwrap().position
}

/// Eight appends to new streams `<burst>-0` … `<burst>-7`, runnable at once: how many commits
/// they took.
async fn commits_of_runnable_appends(store: &PostgresStore, burst: &str) -> usize {
    let mut transactions = HashSet::new();
    for written in runnable_appends(store, burst, ExpectedVersion::NoStream).await {
        let written = written.unwrap();
        assert_eq!(written.stream_version, StreamVersion::new(1));
        transactions.insert(written.position.tx);
    }
    transactions.len()
}

/// Eight appends of one event to new streams `<burst>-0` … `<burst>-7`, runnable at once, the
/// first seven expecting no stream and the last `last_expects`: their results, in that order.
async fn runnable_appends(
    store: &PostgresStore,
    burst: &str,
    last_expects: ExpectedVersion,
) -> Vec<Result<AppendResult, StoreError>> {
    const TASKS: usize = 8;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = store.clone();
            let stream = StreamId::new("account", format!("{burst}-{t}"));
            let expected = if t + 1 == TASKS {
                last_expects
            } else {
                ExpectedVersion::NoStream
            };
            tokio::spawn(async move { store.append(&stream, expected, batch(1)).await })
        })
        .collect();
    let mut results = Vec::new();
    for task in tasks {
        results.push(task.await.unwrap());
    }
    results
}

/// A group whose write waits on a lock must not hold up the appends queued behind it for as long
/// as the lock is held: that could be forever. Here a transaction appends to stream `x` and stays
/// open; a group-commit append to `x` then waits on its row lock, holding the only slot; and the
/// transaction's owner appends to `y` through group commit before it commits. Queued behind the
/// stuck write, that append would wait for the transaction, which waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_stuck_on_a_lock_does_not_hold_up_the_appends_behind_it() {
    assert_eq!(GroupCommit::default().max_in_flight, 1);
    let (store, tx, stuck) = a_write_stuck_on_a_lock().await;
    let y = StreamId::new("account", "y");
    let started = std::time::Instant::now();
    let other = tokio::time::timeout(
        Duration::from_secs(5),
        store.append(&y, ExpectedVersion::NoStream, batch(1)),
    )
    .await
    .expect("the append to y waited behind the write stuck on x's lock")
    .unwrap();
    assert_eq!(other.stream_version, StreamVersion::new(1));
    eprintln!("append to y done after {:?}", started.elapsed());
    tx.commit().await.unwrap();
    // The stuck append lost the race to the transaction: its own conflict, nothing written.
    match stuck.await.unwrap() {
        Err(StoreError::Concurrency(conflict)) => {
            assert_eq!(conflict.actual, StreamVersion::new(2), "{conflict:?}")
        }
        other => panic!("expected a concurrency conflict, got {other:?}"),
    }
    drop_schema(&store).await;
}

/// A group-commit store (default settings) whose one write in flight waits on a lock: stream `x`
/// is at version 1, the returned transaction has appended its version 2 and stays open, and the
/// returned task's append to `x` (expecting version 1) waits on that transaction's row lock.
async fn a_write_stuck_on_a_lock() -> (
    cqrs_postgres::PostgresStore,
    sqlx::Transaction<'static, sqlx::Postgres>,
    tokio::task::JoinHandle<Result<AppendResult, StoreError>>,
) {
    let store = fresh_store_with(8)
        .await
        .with_group_commit(GroupCommit::default());
    let x = StreamId::new("account", "x");
    store
        .append(&x, ExpectedVersion::NoStream, batch(1))
        .await
        .unwrap();
    let mut tx = store.pool().begin().await.unwrap();
    store
        .append_in(
            &mut tx,
            &x,
            ExpectedVersion::Exact(StreamVersion::new(1)),
            batch(1),
        )
        .await
        .unwrap();
    let stuck = tokio::spawn({
        let store = store.clone();
        async move {
            store
                .append(&x, ExpectedVersion::Exact(StreamVersion::new(1)), batch(1))
                .await
        }
    });
    wait_for_lock_waits(&store, 1).await;
    (store, tx, stuck)
}

/// Waits until `count` of the store's backends wait on a lock (the tests name them after the
/// schema).
async fn wait_for_lock_waits(store: &cqrs_postgres::PostgresStore, count: i64) {
    let mut probe = sqlx::PgConnection::connect(&crate::url()).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
        )
        .bind(store.schema())
        .fetch_one(&mut probe)
        .await
        .unwrap();
        if waiting >= count {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{waiting} appends waited on a lock, not {count}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A group whose statement collides with a concurrent transaction's write of one member's stream
/// version is written again: that member alone gets its conflict, and the others still commit
/// together, in one transaction, rather than each appending alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_that_collides_on_one_stream_commits_the_others_together() {
    let (store, mut tx, stuck) = a_write_stuck_on_a_lock().await;
    // The open transaction also writes the hot stream's first version.
    let hot = StreamId::new("account", "hot");
    store
        .append_in(&mut tx, &hot, ExpectedVersion::NoStream, batch(1))
        .await
        .unwrap();
    // Queued behind the stuck write, these go out as one group from the extra slot, and its
    // statement waits on the hot stream's row lock.
    let ids = ["hot", "s1", "s2", "s3", "s4", "s5"];
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| {
            let store = store.clone();
            let stream = StreamId::new("account", *id);
            tokio::spawn(async move {
                store
                    .append(&stream, ExpectedVersion::NoStream, batch(1))
                    .await
            })
        })
        .collect();
    wait_for_lock_waits(&store, 2).await;
    tx.commit().await.unwrap();

    assert!(
        matches!(stuck.await.unwrap(), Err(StoreError::Concurrency(_))),
        "the stuck write lost its race"
    );
    let mut transactions = HashSet::new();
    for (id, task) in ids.iter().zip(tasks) {
        match (*id, task.await.unwrap()) {
            ("hot", Err(StoreError::Concurrency(c))) => {
                assert_eq!(c.actual, StreamVersion::new(1));
            }
            ("hot", other) => panic!("hot: expected a conflict, got {other:?}"),
            (_, Ok(appended)) => {
                transactions.insert(appended.position.tx);
            }
            (id, Err(e)) => panic!("{id}: {e}"),
        }
    }
    assert_eq!(
        transactions.len(),
        1,
        "the group's other members committed together"
    );
    drop_schema(&store).await;
}

/// An append to a stream that is being written already goes alone at once (like an append
/// without group commit) instead of into a later group, whose other members would wait with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_append_to_a_stream_being_written_does_not_hold_up_the_next_group() {
    let (store, tx, stuck) = a_write_stuck_on_a_lock().await;
    let x = StreamId::new("account", "x");
    let second = tokio::spawn({
        let store = store.clone();
        let x = x.clone();
        async move {
            store
                .append(&x, ExpectedVersion::Exact(StreamVersion::new(1)), batch(1))
                .await
        }
    });
    wait_for_lock_waits(&store, 2).await;
    // Queued behind the stuck write, this goes from the extra slot; had the second append of `x`
    // been queued with it, the two would have been one group, stuck on `x`'s lock.
    let y = StreamId::new("account", "y");
    tokio::time::timeout(
        Duration::from_secs(30),
        store.append(&y, ExpectedVersion::NoStream, batch(1)),
    )
    .await
    .expect("the append to y waited for the transaction holding x")
    .unwrap();
    tx.commit().await.unwrap();
    for task in [stuck, second] {
        assert!(matches!(
            task.await.unwrap(),
            Err(StoreError::Concurrency(_))
        ));
    }
    drop_schema(&store).await;
}

/// A runtime shut down while an append waits in the queue behind a write in flight: the write's
/// task is dropped, its slot hands over by spawning a successor, and the closing runtime drops
/// that task at once, inside `spawn`. Its slot must not spawn again (that recursed until the
/// stack overflowed and aborted the process).
#[test]
fn a_runtime_shut_down_with_an_append_queued_behind_a_write_does_not_crash() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let schema = runtime.block_on(async {
        let (store, tx, _stuck) = a_write_stuck_on_a_lock().await;
        // The transaction outlives this block, in a task of its own.
        tokio::spawn(async move {
            let _open = tx;
            std::future::pending::<()>().await;
        });
        // An append queued behind the stuck write.
        let queued = store.clone();
        let state = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(0));
        let seen = std::sync::Arc::clone(&state);
        tokio::spawn(async move {
            let y = StreamId::new("account", "y");
            seen.store(1, std::sync::atomic::Ordering::SeqCst);
            let _ = queued.append(&y, ExpectedVersion::NoStream, batch(1)).await;
            seen.store(2, std::sync::atomic::Ordering::SeqCst);
        });
        let started = std::time::Instant::now();
        while state.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "the append never started"
            );
            tokio::task::yield_now().await;
        }
        // Well within the wait before a queued append may take an extra slot.
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(
            state.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the precondition: the append has started and is still waiting behind the stuck write"
        );
        store.schema().to_owned()
    });
    drop(runtime);
    let cleanup = tokio::runtime::Runtime::new().unwrap();
    cleanup.block_on(async {
        let mut conn = sqlx::PgConnection::connect(&crate::url()).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP SCHEMA \"{schema}\" CASCADE"
        )))
        .execute(&mut conn)
        .await
        .unwrap();
    });
}

/// A slot keeps its connection only while appends keep coming: shortly after they stop, every
/// connection is back in the pool, where the application can have it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_gives_its_connections_back_when_the_appends_stop() {
    const TASKS: usize = 8;
    const APPENDS: usize = 20;
    let store = fresh_store_with(4)
        .await
        .with_group_commit(GroupCommit::default());
    let mut tasks = Vec::new();
    for t in 0..TASKS {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new("account", format!("r{t}"));
            for _ in 0..APPENDS {
                store
                    .append(&stream, ExpectedVersion::Any, batch(1))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // Connections go back to the pool asynchronously (sqlx checks each on its way back), a slot's
    // kept connection after `keep_connection` (20 ms by default), and the store's announcer may be
    // sending a trailing notification: allow a moment.
    let pool = store.pool().clone();
    assert!(
        wait_for(|| pool.num_idle() == pool.size() as usize).await,
        "a connection stayed checked out after the last append: {} idle of {}",
        pool.num_idle(),
        pool.size()
    );
    drop_schema(&store).await;
}

/// A lone writer's appends reuse one connection (put aside for `keep_connection` after each
/// write), and dropping the store gives it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_writer_keeps_one_connection_until_the_store_is_dropped() {
    let (store, pool) = keeping_store().await;
    let stream = StreamId::new("account", "lone");
    for n in 0..3_u64 {
        store
            .append(
                &stream,
                ExpectedVersion::Exact(StreamVersion::new(n)),
                batch(1),
            )
            .await
            .unwrap();
    }
    // Connections on their way back arrive; the kept one stays out.
    assert_keeps_one(&pool).await;
    drop_schema(&store).await;
    drop(store);
    assert!(
        wait_for(|| pool.num_idle() == pool.size() as usize).await,
        "the dropped store's kept connection did not come back: {} idle of {}",
        pool.num_idle(),
        pool.size()
    );
}

/// A kept connection skips the pool's health check. If the server closed it meanwhile, the append
/// or the load on it retries on a pooled connection instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_and_loads_on_a_kept_connection_the_server_closed_retry_on_a_fresh_one() {
    let (store, pool) = keeping_store().await;
    let stream = StreamId::new("account", "stale");
    store
        .append(&stream, ExpectedVersion::NoStream, batch(1))
        .await
        .unwrap();
    assert_keeps_one(&pool).await;
    terminate_backends(&store).await;
    let written = store
        .append(
            &stream,
            ExpectedVersion::Exact(StreamVersion::new(1)),
            batch(1),
        )
        .await
        .expect("the append retries on a live connection");
    assert_eq!(written.stream_version, StreamVersion::new(2));
    // The retry reopened the pool with one connection, which the slot gave back (never the last
    // idle one). Open more, and let an append keep one again.
    open_connections(&pool, 3).await;
    store
        .append(
            &stream,
            ExpectedVersion::Exact(StreamVersion::new(2)),
            batch(1),
        )
        .await
        .unwrap();
    assert_keeps_one(&pool).await;
    terminate_backends(&store).await;
    let events = store
        .read_stream(&stream, StreamVersion::new(1), 10)
        .await
        .expect("the load retries on a live connection");
    assert_eq!(events.len(), 3);
    drop_schema(&store).await;
}

/// A load between a command's appends runs on the connection the last append kept, not on
/// another one from the pool. Told apart by what each backend of the pool ran last.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_after_an_append_uses_the_kept_connection() {
    let (store, pool) = keeping_store().await;
    let stream = StreamId::new("account", "affinity");
    store
        .append(&stream, ExpectedVersion::NoStream, batch(1))
        .await
        .unwrap();
    assert_keeps_one(&pool).await;
    assert_eq!(
        store
            .read_stream(&stream, StreamVersion::new(1), 10)
            .await
            .unwrap()
            .len(),
        1
    );
    let mut observer = sqlx::PgConnection::connect(&crate::url()).await.unwrap();
    let last: Vec<String> = sqlx::query_scalar(
        "SELECT query FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
    )
    .bind(store.schema())
    .fetch_all(&mut observer)
    .await
    .unwrap();
    let ran = |start: &str| {
        last.iter()
            .filter(|q| q.trim_start().starts_with(start) && q.contains(".events"))
            .count()
    };
    // The kept backend ran the append's INSERT, then the load's SELECT: no backend's last
    // statement is the INSERT.
    assert_eq!(
        (ran("INSERT"), ran("SELECT position")),
        (0, 1),
        "last statements of the pool's backends: {last:#?}"
    );
    drop_schema(&store).await;
}

/// A load that finds no kept connection idle keeps the one it took from the pool, so that the
/// next command's load (or write) skips the pool's round trips too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_keeps_the_connection_it_took_from_the_pool() {
    let (store, pool) = keeping_store().await;
    let stream = StreamId::new("account", "first-load");
    // Nothing written yet, so nothing kept: the load takes a connection from the pool.
    assert!(store
        .read_stream(&stream, StreamVersion::new(1), 10)
        .await
        .unwrap()
        .is_empty());
    assert_keeps_one(&pool).await;
    drop_schema(&store).await;
}

/// Concurrent loads keep at most three connections (one for the write slot, two for loads); the
/// rest go back to the pool. Usually all six loads hold a connection at once and exactly three
/// are kept; on a loaded machine a load can finish in its first poll (its reply already there)
/// and the next one borrows the connection it kept, so fewer may be: at least one, never more
/// than three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_loads_keep_at_most_three_connections() {
    let store = fresh_store_with(8)
        .await
        .with_group_commit(GroupCommit::default().with_keep_connection(Duration::from_secs(30)));
    let pool = store.pool().clone();
    open_connections(&pool, 7).await;
    let stream = StreamId::new("account", "many-loads");
    // Polled together, every load takes its connection before any answer arrives.
    let loads = futures_util::future::join_all(
        (0..6).map(|_| store.read_stream(&stream, StreamVersion::new(1), 10)),
    )
    .await;
    assert!(loads.into_iter().all(|events| events.unwrap().is_empty()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let kept = || pool.size() as usize - pool.num_idle();
    assert!(
        wait_for(|| (1..=3).contains(&kept())).await,
        "expected one to three kept connections: {} idle of {}",
        pool.num_idle(),
        pool.size()
    );
    drop_schema(&store).await;
}

/// A store whose group commit keeps connections for 30 s (longer than any test), on a pool with
/// three connections open.
async fn keeping_store() -> (cqrs_postgres::PostgresStore, sqlx::PgPool) {
    let store = fresh_store_with(4)
        .await
        .with_group_commit(GroupCommit::default().with_keep_connection(Duration::from_secs(30)));
    let pool = store.pool().clone();
    open_connections(&pool, 3).await;
    (store, pool)
}

/// Opens `n` connections in the pool (checked out at once, then back), so that a slot may keep
/// one: it never keeps the pool's last idle connection.
async fn open_connections(pool: &sqlx::PgPool, n: usize) {
    let held: Vec<_> = futures_util::future::join_all((0..n).map(|_| pool.acquire()))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    drop(held);
    // Let them arrive back (sqlx pings each on its way).
    assert!(
        wait_for(|| pool.num_idle() >= n).await,
        "connections did not come back"
    );
}

/// Checks that exactly one of the pool's connections is out, the one group commit keeps, once
/// connections on their way back to the pool (sqlx pings each) have arrived.
async fn assert_keeps_one(pool: &sqlx::PgPool) {
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        wait_for(|| pool.num_idle() + 1 == pool.size() as usize).await,
        "expected one kept connection: {} idle of {}",
        pool.num_idle(),
        pool.size()
    );
}

/// Terminates every backend of this store's pool (the tests name them after the schema), from a
/// connection of its own, and waits until they are gone.
async fn terminate_backends(store: &cqrs_postgres::PostgresStore) {
    let mut killer = sqlx::PgConnection::connect(&crate::url()).await.unwrap();
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE application_name = $1 AND pid <> pg_backend_pid()",
    )
    .bind(store.schema())
    .execute(&mut killer)
    .await
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND pid <> pg_backend_pid()",
        )
        .bind(store.schema())
        .fetch_one(&mut killer)
        .await
        .unwrap();
        if left == 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{left} backends still running after pg_terminate_backend"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `done` for up to 5 s.
async fn wait_for(done: impl Fn() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !done() {
        if std::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// A store dropped after its runtime (a kept connection still aside) must not panic: sqlx would
/// need a runtime to take the connection back.
#[test]
fn a_store_with_a_kept_connection_can_be_dropped_after_its_runtime() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (store, pool) = runtime.block_on(async {
        let (store, pool) = keeping_store().await;
        store
            .append(
                &StreamId::new("account", "late"),
                ExpectedVersion::NoStream,
                batch(1),
            )
            .await
            .unwrap();
        assert_keeps_one(&pool).await;
        drop_schema(&store).await;
        (store, pool)
    });
    drop(runtime);
    drop(store);
    drop(pool);
}

/// The pool of `connect` skips the checkout ping only for a connection taken back moments ago:
/// one the server closed while it sat idle is pinged on checkout and replaced, and the append that
/// gets the pool's connection never sees the dead one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_server_closed_while_idle_is_replaced_on_checkout() {
    let store = fresh_store_with(2).await.without_group_commit();
    let stream = StreamId::new("account", "idle");
    store
        .append(&stream, ExpectedVersion::NoStream, batch(1))
        .await
        .unwrap();
    terminate_backends(&store).await;
    // Idle past the window in which the pool hands a connection out unchecked, and past the
    // store's memory of a failed connection (none failed here: the store used none since).
    tokio::time::sleep(Duration::from_millis(2_600)).await;
    store
        .append(
            &stream,
            ExpectedVersion::Exact(StreamVersion::new(1)),
            batch(1),
        )
        .await
        .expect("the pool hands out a live connection");
    assert_eq!(store.stream_version(&stream).await.unwrap().get(), 2);
    drop_schema(&store).await;
}
