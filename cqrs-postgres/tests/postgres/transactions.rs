//! Appending and checkpointing inside the caller's transaction; notifications; the horizon report.

use std::time::{Duration, Instant};

use cqrs_core::{
    CheckpointStore, EventStore, EventTypes, ExpectedVersion, Position, StoreError, StreamId,
    StreamVersion,
};

use crate::{batch, drop_schema, fresh_store, fresh_store_with};

async fn read_model(store: &cqrs_postgres::PostgresStore) -> Vec<String> {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT note FROM \"{}\".read_model ORDER BY note",
        store.schema()
    )))
    .fetch_all(store.pool())
    .await
    .unwrap()
}

async fn create_read_model(store: &cqrs_postgres::PostgresStore) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE \"{}\".read_model (note text PRIMARY KEY)",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap();
}

async fn note(conn: &mut sqlx::PgConnection, store: &cqrs_postgres::PostgresStore, text: &str) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{}\".read_model (note) VALUES ($1)",
        store.schema()
    )))
    .bind(text)
    .execute(conn)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_in_commits_with_the_callers_writes_or_not_at_all() {
    let store = fresh_store().await;
    create_read_model(&store).await;
    let stream = StreamId::new("order", "o-1");
    let mut listener = store.listen().await.unwrap();

    // Rolled back: no events, no read-model row, no notification.
    let mut tx = store.pool().begin().await.unwrap();
    let phantom = store
        .append_in(&mut tx, &stream, ExpectedVersion::NoStream, batch(3))
        .await
        .unwrap();
    assert_eq!(phantom.stream_version, StreamVersion::new(3));
    note(&mut tx, &store, "rolled back").await;
    tx.rollback().await.unwrap();
    assert_eq!(
        store.stream_version(&stream).await.unwrap(),
        StreamVersion::INITIAL
    );
    assert!(store
        .read_all(Position::START, EventTypes::All, 10)
        .await
        .unwrap()
        .is_empty());
    assert!(read_model(&store).await.is_empty());
    assert!(
        tokio::time::timeout(Duration::from_millis(200), listener.recv())
            .await
            .is_err(),
        "a rolled-back append notified"
    );

    // Committed: events, read model and notification together.
    let mut tx = store.pool().begin().await.unwrap();
    let written = store
        .append_in(&mut tx, &stream, ExpectedVersion::NoStream, batch(2))
        .await
        .unwrap();
    note(&mut tx, &store, "committed").await;
    // A conflict inside the transaction is an error, and leaves the transaction usable.
    match store
        .append_in(&mut tx, &stream, ExpectedVersion::NoStream, batch(1))
        .await
    {
        Err(StoreError::Concurrency(c)) => assert_eq!(c.actual, StreamVersion::new(2)),
        other => panic!("{other:?}"),
    }
    // So does an idempotent retry, which returns the original result.
    let retry_batch = batch(1);
    let third = store
        .append_in(
            &mut tx,
            &stream,
            ExpectedVersion::Exact(StreamVersion::new(2)),
            retry_batch.clone(),
        )
        .await
        .unwrap();
    let again = store
        .append_in(
            &mut tx,
            &stream,
            ExpectedVersion::Exact(StreamVersion::new(2)),
            retry_batch,
        )
        .await
        .unwrap();
    assert_eq!(again, third);
    note(&mut tx, &store, "still usable").await;
    tx.commit().await.unwrap();
    // One notification per append that wrote, on commit, in order.
    for expected in [written.position, third.position] {
        let notified = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .expect("notified on commit")
            .unwrap();
        assert_eq!(
            notified,
            Some(expected),
            "carries the append's last position"
        );
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(200), listener.recv())
            .await
            .is_err(),
        "the refused append and the retry notified"
    );
    let events = store
        .read_all(Position::START, EventTypes::All, 10)
        .await
        .unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[1].position, written.position);
    assert_eq!(events[2].position, third.position);
    assert_eq!(read_model(&store).await, ["committed", "still usable"]);

    // Outside a transaction: a clear error, nothing written.
    let mut conn = store.pool().acquire().await.unwrap();
    let error = store
        .append_in(&mut conn, &stream, ExpectedVersion::Any, batch(1))
        .await
        .unwrap_err();
    assert!(
        error.to_string().contains("inside a transaction"),
        "{error}"
    );
    assert_eq!(
        store.stream_version(&stream).await.unwrap(),
        StreamVersion::new(3)
    );
    drop_schema(&store).await;
}

/// A transaction that reads from one snapshot cannot see an append committed after it began:
/// `append_in` says so instead of reporting the snapshot's version as the stream's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_in_a_snapshot_that_misses_the_streams_latest_events_says_so() {
    let store = fresh_store().await;
    for level in ["REPEATABLE READ", "SERIALIZABLE"] {
        let stream = StreamId::new("order", level.replace(' ', "-").to_lowercase());
        let mut tx = store.pool().begin().await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SET TRANSACTION ISOLATION LEVEL {level}"
        )))
        .execute(&mut *tx)
        .await
        .unwrap();
        // The first query takes the snapshot: the stream does not exist in it.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{}\".events",
            store.schema()
        )))
        .execute(&mut *tx)
        .await
        .unwrap();
        // Another connection appends to the stream.
        store
            .append(&stream, ExpectedVersion::NoStream, batch(1))
            .await
            .unwrap();

        for expected in [
            ExpectedVersion::NoStream,
            ExpectedVersion::Exact(StreamVersion::INITIAL),
            // What the stream really is at: the snapshot cannot see it either.
            ExpectedVersion::Exact(StreamVersion::new(1)),
            ExpectedVersion::Any,
        ] {
            let started = Instant::now();
            let error = store
                .append_in(&mut tx, &stream, expected, batch(2))
                .await
                .unwrap_err();
            match &error {
                StoreError::StaleSnapshot {
                    stream: s,
                    expected: e,
                    snapshot_version,
                } => {
                    assert_eq!((s, *e), (&stream, expected), "{level}");
                    assert_eq!(*snapshot_version, StreamVersion::INITIAL, "{level}");
                }
                other => panic!("{level}, {expected:?}: {other:?} ({other})"),
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{level}, {expected:?}: answered without spinning on the race retries"
            );
        }
        // Nothing was written, and the transaction is still usable.
        let n: i64 = sqlx::query_scalar("SELECT 1::bigint")
            .fetch_one(&mut *tx)
            .await
            .unwrap();
        assert_eq!(n, 1);
        tx.rollback().await.unwrap();
        assert_eq!(
            store.stream_version(&stream).await.unwrap(),
            StreamVersion::new(1)
        );
    }

    // In READ COMMITTED every statement sees what is committed: a plain conflict, with the
    // stream's real version.
    let stream = StreamId::new("order", "read-committed");
    let mut tx = store.pool().begin().await.unwrap();
    store
        .append(&stream, ExpectedVersion::NoStream, batch(1))
        .await
        .unwrap();
    match store
        .append_in(&mut tx, &stream, ExpectedVersion::NoStream, batch(1))
        .await
    {
        Err(StoreError::Concurrency(c)) => assert_eq!(c.actual, StreamVersion::new(1)),
        other => panic!("{other:?}"),
    }
    tx.rollback().await.unwrap();
    drop_schema(&store).await;
}

#[tokio::test]
async fn checkpoint_compare_and_set_commits_with_the_read_model() {
    let store = fresh_store().await;
    create_read_model(&store).await;
    let (p1, p2) = (Position::new(5, 1), Position::new(9, 4));

    let mut tx = store.pool().begin().await.unwrap();
    note(&mut tx, &store, "batch 1").await;
    store
        .save_checkpoint_in(&mut tx, "balances", None, p1)
        .await
        .unwrap();
    assert_eq!(
        store.load_checkpoint_in(&mut tx, "balances").await.unwrap(),
        Some(p1)
    );
    tx.rollback().await.unwrap();
    assert_eq!(store.load_checkpoint("balances").await.unwrap(), None);
    assert!(read_model(&store).await.is_empty());

    let mut tx = store.pool().begin().await.unwrap();
    note(&mut tx, &store, "batch 1").await;
    store
        .save_checkpoint_in(&mut tx, "balances", None, p1)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(store.load_checkpoint("balances").await.unwrap(), Some(p1));

    // Two runners read p1; the second one's compare-and-set fails and it rolls back.
    let mut first = store.pool().begin().await.unwrap();
    let mut second = store.pool().begin().await.unwrap();
    note(&mut first, &store, "batch 2 (first)").await;
    store
        .save_checkpoint_in(&mut first, "balances", Some(p1), p2)
        .await
        .unwrap();
    first.commit().await.unwrap();
    note(&mut second, &store, "batch 2 (second)").await;
    match store
        .save_checkpoint_in(&mut second, "balances", Some(p1), p2)
        .await
    {
        Err(StoreError::CheckpointConflict { actual, .. }) => assert_eq!(actual, Some(p2)),
        other => panic!("{other:?}"),
    }
    second.rollback().await.unwrap();
    assert_eq!(read_model(&store).await, ["batch 1", "batch 2 (first)"]);
    drop_schema(&store).await;
}

#[tokio::test]
async fn a_stream_keeps_version_order_in_the_global_log_when_the_appender_started_earlier() {
    let store = fresh_store().await;
    let stream = StreamId::new("s", "1");
    // This transaction gets its id first (before the other writer), and appends second.
    let mut early = store.pool().begin().await.unwrap();
    let _: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
        .fetch_one(&mut *early)
        .await
        .unwrap();
    let first = store
        .append(&stream, ExpectedVersion::NoStream, batch(1))
        .await
        .unwrap();
    let second = store
        .append_in(
            &mut early,
            &stream,
            ExpectedVersion::Exact(StreamVersion::new(1)),
            batch(1),
        )
        .await
        .unwrap();
    early.commit().await.unwrap();
    assert!(second.position > first.position, "{second:?} <= {first:?}");
    let log = store
        .read_all(Position::START, EventTypes::All, 10)
        .await
        .unwrap();
    let versions: Vec<u64> = log.iter().map(|e| e.stream_version.get()).collect();
    assert_eq!(versions, [1, 2]);
    drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_append_wakes_on_notify() {
    let store = fresh_store().await;
    let stream = StreamId::new("s", "1");
    // Start the listener, and let it connect.
    store
        .wait_for_append(Position::START, Duration::from_millis(300))
        .await;
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            store
                .wait_for_append(Position::START, Duration::from_secs(20))
                .await;
            started.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Appended through another store (as another process would): only the notification, not
    // the appending store's in-process shortcut, can wake the waiter.
    let other =
        cqrs_postgres::PostgresStore::new(sqlx::PgPool::connect(&crate::url()).await.unwrap())
            .with_schema(store.schema())
            .unwrap();
    let written = other
        .append(&stream, ExpectedVersion::NoStream, batch(1))
        .await
        .unwrap();
    let waited = waiter.await.unwrap();
    assert!(
        waited < Duration::from_secs(5),
        "woke after {waited:?}, not on the notification"
    );
    // Already notified past `after`: returns at once.
    let started = Instant::now();
    store
        .wait_for_append(Position::START, Duration::from_secs(20))
        .await;
    assert!(started.elapsed() < Duration::from_secs(1));
    // Nothing after the last append: waits for the timeout.
    let started = Instant::now();
    store
        .wait_for_append(written.position, Duration::from_millis(200))
        .await;
    assert!(started.elapsed() >= Duration::from_millis(190));
    drop_schema(&store).await;
}

/// Any role may notify on the store's channel: a bogus position far ahead makes waiters return at
/// once only briefly, and real appends (at lower positions) still wake them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bogus_notification_is_only_a_brief_hint() {
    let store = fresh_store().await;
    let stream = StreamId::new("s", "1");
    let head = store
        .append(&stream, ExpectedVersion::NoStream, batch(1))
        .await
        .unwrap()
        .position;
    // Start the listener, and let it connect.
    store
        .wait_for_append(head, Duration::from_millis(300))
        .await;
    let bogus = Position::new(u64::MAX >> 1, u64::MAX >> 1);
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(store.notification_channel())
        .bind(bogus.to_string())
        .execute(store.pool())
        .await
        .unwrap();
    // Long enough for it to arrive and then go stale.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let started = Instant::now();
    store.wait_for_append(head, Duration::from_secs(3)).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "returned after {waited:?}: a notified position stuck beyond every append"
    );

    // Another process (another store on the schema) appends: its notification wakes the waiter,
    // although its position is below the bogus one.
    let other_pool = sqlx::PgPool::connect(&crate::url()).await.unwrap();
    let other = cqrs_postgres::PostgresStore::new(other_pool)
        .with_schema(store.schema())
        .unwrap();
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            store.wait_for_append(head, Duration::from_secs(30)).await;
            started.elapsed()
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    other
        .append(
            &stream,
            ExpectedVersion::Exact(StreamVersion::new(1)),
            batch(1),
        )
        .await
        .unwrap();
    let waited = waiter.await.unwrap();
    assert!(
        waited < Duration::from_secs(10),
        "woke after {waited:?}, not on the real notification"
    );
    other.pool().close().await;
    drop_schema(&store).await;
}

#[tokio::test]
async fn the_horizon_report_names_the_transaction_holding_it() {
    let store = fresh_store().await;
    let mut open = store.pool().begin().await.unwrap();
    let (xid, pid): (String, i32) =
        sqlx::query_as("SELECT pg_current_xact_id()::text, pg_backend_pid()")
            .fetch_one(&mut *open)
            .await
            .unwrap();
    let xid: u64 = xid.parse().unwrap();
    store
        .append(
            &StreamId::new("s", "1"),
            ExpectedVersion::NoStream,
            batch(2),
        )
        .await
        .unwrap();
    let horizon = store.horizon().await.unwrap();
    assert!(horizon.xmin <= xid, "{horizon}");
    assert_eq!(horizon.waiting_events, 2, "{horizon}");
    let holder = horizon.held_by.clone().expect("someone holds the horizon");
    // Another test's older transaction may be the holder; if it is ours, it is named precisely.
    if holder.xid == xid {
        assert_eq!(holder.pid, Some(pid));
        assert_eq!(holder.application_name.as_deref(), Some(store.schema()));
        assert!(holder.since.is_some());
    }
    assert!(
        horizon.to_string().starts_with("held back by transaction"),
        "{horizon}"
    );
    open.rollback().await.unwrap();
    let impatient = store.clone().with_horizon_wait(Duration::from_secs(5));
    assert_eq!(
        impatient
            .read_all(Position::START, EventTypes::All, 10)
            .await
            .unwrap()
            .len(),
        2
    );
    drop_schema(&store).await;
}

/// Another process (here: another store on the same schema, with its own pool and announcer)
/// hears about plain appends: promptly after a single one, and, after a burst from several
/// writers, up to the last event, through far fewer notifications than appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_processes_hear_every_burst_of_appends_up_to_its_last_event() {
    let writer = fresh_store_with(6).await;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&crate::url())
        .await
        .unwrap();
    let other = cqrs_postgres::PostgresStore::new(pool)
        .with_schema(writer.schema())
        .unwrap();
    let mut listener = other.listen().await.unwrap();
    let single = writer
        .append(
            &StreamId::new("s", "single"),
            ExpectedVersion::NoStream,
            batch(1),
        )
        .await
        .unwrap();
    heard_up_to(&mut listener, single.position).await;

    let mut tasks = Vec::new();
    for t in 0..4 {
        let writer = writer.clone();
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new("s", format!("burst{t}"));
            let mut last = None;
            for i in 0..50_u64 {
                let expected = ExpectedVersion::Exact(StreamVersion::new(i));
                last = Some(writer.append(&stream, expected, batch(1)).await.unwrap());
            }
            last.unwrap().position
        }));
    }
    let mut newest = Position::START;
    for task in tasks {
        newest = newest.max(task.await.unwrap());
    }
    let heard = heard_up_to(&mut listener, newest).await;
    assert!(
        heard < 200,
        "{heard} notifications for 200 appends: not coalesced"
    );
    // Two appends in quick succession after a pause: the first carries the notification of its
    // interval, the second (usually within that interval) is left to the trailing one.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let stream = StreamId::new("s", "pair");
    writer
        .append(&stream, ExpectedVersion::NoStream, batch(1))
        .await
        .unwrap();
    let second = writer
        .append(
            &stream,
            ExpectedVersion::Exact(StreamVersion::new(1)),
            batch(1),
        )
        .await
        .unwrap();
    heard_up_to(&mut listener, second.position).await;
    drop_schema(&writer).await;
}

/// Receives notifications until one reaches `target`; how many it took.
async fn heard_up_to(listener: &mut cqrs_postgres::AppendListener, target: Position) -> usize {
    let mut heard = 0;
    loop {
        let notified = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .unwrap_or_else(|_| panic!("no notification reached {target}"))
            .unwrap()
            .expect("the listener kept its connection");
        heard += 1;
        if notified >= target {
            return heard;
        }
    }
}
