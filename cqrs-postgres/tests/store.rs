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

/// A store on a new schema. Callers hold `TURN` (see the module docs).
async fn fresh_store() -> PostgresStore {
    let url = url();
    let store = PostgresStore::connect(&url)
        .await
        .unwrap_or_else(|e| panic!("PostgreSQL is required at {url} (set DATABASE_URL): {e}"));
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    let store = store.with_schema(&schema).unwrap();
    store.migrate().await.unwrap();
    store
}

async fn fresh() -> (PostgresStore, MutexGuard<'static, ()>) {
    let turn = TURN.lock().await;
    (fresh_store().await, turn)
}

cqrs_core::backend_conformance_tests!(fresh_store, serialized_by = TURN);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn torture_sixteen_writers_twenty_thousand_events() {
    use std::collections::{HashMap, HashSet};
    let (store, _turn) = fresh().await;
    let mut writers = Vec::new();
    for w in 0..16 {
        let store = store.clone();
        // Half the writers share four hot streams, half write their own.
        let stream = if w % 2 == 0 {
            StreamId::new("t", format!("hot-{}", w % 4))
        } else {
            StreamId::new("t", format!("own-{w}"))
        };
        writers.push(tokio::spawn(async move {
            let mut sent = Vec::new();
            for _ in 0..125 {
                let batch: Vec<NewEvent> = (0..10)
                    .map(|n| NewEvent::from_event(&conformance::Added { n }).unwrap())
                    .collect();
                loop {
                    let at = store.stream_version(&stream).await.unwrap();
                    match store
                        .append(&stream, ExpectedVersion::Exact(at), batch.clone())
                        .await
                    {
                        Ok(_) => break,
                        Err(cqrs_core::StoreError::Concurrency(_)) => {}
                        Err(e) => panic!("{e}"),
                    }
                }
                sent.extend(batch.iter().map(|e| e.event_id));
            }
            sent
        }));
    }
    let mut sent = HashSet::new();
    for w in writers {
        sent.extend(w.await.unwrap());
    }
    assert_eq!(sent.len(), 20_000);
    let all: Vec<_> =
        futures_util::TryStreamExt::try_collect::<Vec<_>>(cqrs_core::store::read_all_batched(
            &store,
            Position::START,
            cqrs_core::EventTypes::All,
            1000,
        ))
        .await
        .unwrap();
    assert_eq!(all.len(), 20_000, "nothing lost, nothing duplicated");
    assert_eq!(all.iter().map(|e| e.event_id).collect::<HashSet<_>>(), sent);
    assert_eq!(
        all.iter()
            .map(|e| e.position.sequence)
            .collect::<HashSet<_>>()
            .len(),
        20_000,
        "positions unique"
    );
    let mut versions: HashMap<&StreamId, Vec<u64>> = HashMap::new();
    for e in &all {
        versions
            .entry(&e.stream)
            .or_default()
            .push(e.stream_version.get());
    }
    for (stream, mut v) in versions {
        v.sort_unstable();
        assert_eq!(
            v,
            (1..=v.len() as u64).collect::<Vec<_>>(),
            "{stream} versions dense"
        );
    }
}

#[tokio::test]
async fn bad_rows_are_typed_errors_naming_the_position() {
    use cqrs_core::{DecodeError, ExecuteError, Repository};
    let (store, _turn) = fresh().await;
    let insert = |id: &str, event_type: &str, version: i32, payload: &str| {
        format!(
            "INSERT INTO \"{}\".events (stream_type, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
             VALUES ('counter', '{id}', 1, '{}', '{event_type}', {version}, '{payload}', '{{}}')",
            store.schema(),
            uuid::Uuid::now_v7()
        )
    };
    let repo = Repository::<conformance::Counter>::new(store.clone());
    for (event_type, version, payload, check) in [
        ("Added", 1, r#"{"n": "not a number"}"#, "malformed payload"),
        ("Renamed", 1, r#"{}"#, "unknown event type"),
        ("Added", 7, r#"{"n": 1}"#, "schema version 7"),
    ] {
        sqlx::query(sqlx::AssertSqlSafe(insert(
            check, event_type, version, payload,
        )))
        .execute(store.pool())
        .await
        .unwrap();
        match repo.load(check).await {
            Err(error) => {
                let error = ExecuteError::<std::convert::Infallible>::from(error);
                let message = error.to_string();
                assert!(message.contains("position"), "{message}");
                match error {
                    ExecuteError::Decode { source, .. } => {
                        let ok = match source {
                            DecodeError::Payload { .. } => check == "malformed payload",
                            DecodeError::UnknownEventType { .. } => check == "unknown event type",
                            DecodeError::UnsupportedVersion { version: 7, .. } => {
                                check == "schema version 7"
                            }
                            _ => false,
                        };
                        assert!(ok, "{check}: {message}");
                    }
                    other => panic!("{check}: {other}"),
                }
            }
            Ok(_) => panic!("{check}: loaded a stream with a bad event"),
        }
    }
    // A column lost to a bad migration: a typed error, no panic.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "ALTER TABLE \"{}\".events DROP COLUMN metadata",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap();
    let err = store
        .read_all(Position::START, cqrs_core::EventTypes::All, 10)
        .await
        .unwrap_err();
    assert!(matches!(err, cqrs_core::StoreError::Backend(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_connections_fail_typed_and_write_nothing_partial() {
    let (store, _turn) = fresh().await;
    let stream = StreamId::new("ledger", "k");
    let appender = {
        let store = store.clone();
        let stream = stream.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, 0u32);
            for _ in 0..200 {
                let batch: Vec<NewEvent> = (0..20)
                    .map(|n| NewEvent::from_event(&conformance::Added { n }).unwrap())
                    .collect();
                match store.append(&stream, ExpectedVersion::Any, batch).await {
                    Ok(_) => ok += 1,
                    Err(e) if e.is_transient() => failed += 1,
                    Err(cqrs_core::StoreError::Backend(_)) => failed += 1,
                    Err(e) => panic!("unexpected error kind: {e}"),
                }
            }
            (ok, failed)
        })
    };
    let killer = PostgresStore::connect(&url()).await.unwrap();
    for _ in 0..10 {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        sqlx::query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name = '' AND state <> 'idle'",
        )
        .execute(killer.pool())
        .await
        .unwrap();
    }
    let (ok, failed) = appender.await.unwrap();
    eprintln!("appends: {ok} ok, {failed} failed with a typed error");
    assert!(
        failed > 0,
        "no kill landed during an append; the test proved nothing"
    );
    // Later calls succeed, and every stored batch is whole: versions dense, a multiple of 20.
    let after = store
        .append(
            &stream,
            ExpectedVersion::Any,
            vec![NewEvent::from_event(&conformance::Added { n: 0 }).unwrap()],
        )
        .await;
    assert!(after.is_ok(), "{after:?}");
    let version = store.stream_version(&stream).await.unwrap().get();
    assert_eq!((version - 1) % 20, 0, "a batch was half-written");
    assert!(
        u64::from(ok) * 20 < version,
        "every reported success is stored"
    );
}
