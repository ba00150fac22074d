//! The PostgreSQL store against the real database at `DATABASE_URL`.
//!
//! Each test gets its own schema. They still take turns (one global lock): the gap-free read
//! horizon is cluster-wide, so another test's open transaction would legitimately delay this test's
//! reads, which would make "read back right after appending" assertions timing-dependent.

use std::sync::LazyLock;

use cqrs_core::conformance;
use cqrs_core::{EventStore, ExpectedVersion, NewEvent, Position, StreamId};
use cqrs_postgres::PostgresStore;
use tokio::sync::{Mutex, MutexGuard};

static TURN: LazyLock<Mutex<()>> = LazyLock::new(|| Mutex::new(()));

fn url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

async fn fresh() -> (PostgresStore, MutexGuard<'static, ()>) {
    let turn = TURN.lock().await;
    let url = url();
    let store = PostgresStore::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is required at {url} (set DATABASE_URL): {e}"));
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    let store = store.with_schema(&schema).unwrap();
    store.migrate().await.unwrap();
    (store, turn)
}

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $case() {
            let (store, _turn) = fresh().await;
            conformance::$case(store).await;
        }
    )*};
}

conformance!(
    append_and_read_round_trip,
    expected_version_cases,
    concurrent_appends_lose_and_duplicate_nothing,
    idempotent_append,
    invalid_input_is_rejected,
    hostile_ids_round_trip,
    read_all_order_filter_and_paging,
    snapshots_latest_wins,
    stale_and_broken_snapshots_replay,
    temporal_loads,
    checkpoints_compare_and_set,
);

#[tokio::test]
async fn events_are_immutable() {
    let (store, _turn) = fresh().await;
    let stream = StreamId::new("ledger", "x");
    let event = NewEvent::from_event(&conformance::Added { n: 1 }).unwrap();
    store
        .append(&stream, ExpectedVersion::NoStream, vec![event])
        .await
        .unwrap();
    let events = format!("\"{}\".events", store.schema());
    for statement in [
        format!("UPDATE {events} SET payload = '{{}}'"),
        format!("DELETE FROM {events}"),
        format!("TRUNCATE {events}"),
    ] {
        let err = sqlx::query(sqlx::AssertSqlSafe(statement.as_str()))
            .execute(store.pool())
            .await
            .unwrap_err();
        assert!(
            err.to_string().contains("events are immutable"),
            "{statement}: {err}"
        );
    }
    assert_eq!(
        store
            .count_after(Position::START, cqrs_core::EventTypes::All)
            .await
            .unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reader_never_skips_an_event_committed_late_with_a_lower_position() {
    let (store, _turn) = fresh().await;
    // A transaction takes a low position and stays open while later appends commit.
    let mut slow = store.pool().begin().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{}\".events (stream_type, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
         VALUES ('slow', 's', 1, $1, 'Added', 1, '{{\"n\":0}}', '{{}}')",
        store.schema()
    )))
    .bind(uuid::Uuid::now_v7())
    .execute(&mut *slow)
    .await
    .unwrap();
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..50 {
                let e = NewEvent::from_event(&conformance::Added { n: i }).unwrap();
                store
                    .append(&StreamId::new("fast", "f"), ExpectedVersion::Any, vec![e])
                    .await
                    .unwrap();
            }
        })
    };
    let mut seen = Vec::new();
    let mut cursor = Position::START;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut committed = false;
    while seen.len() < 51 && std::time::Instant::now() < deadline {
        let batch = store
            .read_all(cursor, cqrs_core::EventTypes::All, 7)
            .await
            .unwrap();
        if let Some(last) = batch.last() {
            cursor = last.position;
        }
        seen.extend(batch.into_iter().map(|e| e.position.sequence));
        if !committed && writer.is_finished() {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            assert!(
                seen.is_empty(),
                "nothing may be delivered past the open transaction"
            );
            slow.commit().await.unwrap();
            committed = true;
            // `slow` is consumed; keep polling.
            slow = store.pool().begin().await.unwrap();
        }
    }
    let mut unique = seen.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(seen.len(), 51, "every event delivered");
    assert_eq!(unique.len(), 51, "no event delivered twice");
    assert_eq!(
        seen[0], unique[0],
        "the early position comes first once committed"
    );
    slow.rollback().await.unwrap();
}
