//! Connections killed under running appends and reads (`pg_terminate_backend` on this test's own
//! connections only: the server keeps running for the other tests).

use std::collections::HashMap;
use std::time::Duration;

use cqrs_core::{
    EventId, EventStore, EventTypes, ExpectedVersion, NewEvent, Position, StoreError, StreamId,
};

use crate::{batch, drop_schema, fresh_store_with, url};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_connections_fail_with_connection_errors_and_never_half_write_a_batch() {
    // Every append on a pooled connection: one killed under a write kept by group commit is
    // retried on a fresh connection and succeeds (`group_commit.rs` tests that), so kills that
    // all land on kept connections would surface no error for this test to check. For the same
    // reason half the writers append without group commit: a killed group's members re-send
    // alone, and mostly succeed, so grouped writers alone may see no error at all.
    let store = fresh_store_with(4).await.with_group_commit(
        cqrs_postgres::GroupCommit::default().with_keep_connection(Duration::ZERO),
    );
    let alone = store.clone().without_group_commit();
    let application = store.schema().to_owned();
    let killer = sqlx::PgPool::connect(&url()).await.unwrap();
    let mut tasks = Vec::new();
    for t in 0..4 {
        let store = if t % 2 == 0 {
            alone.clone()
        } else {
            store.clone()
        };
        tasks.push(tokio::spawn(async move {
            let stream = StreamId::new("ledger", format!("k{t}"));
            let mut outcomes: Vec<(Vec<NewEvent>, Result<cqrs_core::AppendResult, StoreError>)> =
                Vec::new();
            let mut reads_failed = 0;
            for i in 0..150 {
                let events = batch(20);
                let result = store
                    .append(&stream, ExpectedVersion::Any, events.clone())
                    .await;
                if let Err(error) = &result {
                    assert!(
                        matches!(
                            error,
                            StoreError::Connection(_) | StoreError::OutcomeUnknown(_)
                        ),
                        "an append failed with something else than a connection error: {error:?}"
                    );
                }
                outcomes.push((events, result));
                if i % 10 == 0 {
                    match store.read_all(Position::START, EventTypes::All, 100).await {
                        Ok(_) => {}
                        Err(StoreError::Connection(_)) => reads_failed += 1,
                        Err(other) => panic!("a read failed with {other:?}"),
                    }
                }
            }
            (stream, outcomes, reads_failed)
        }));
    }
    let mut kills = 0_i64;
    // Until the writers are done: a kill can also land on a pool's health check, which replaces
    // the connection without a caller noticing.
    while tasks.iter().any(|task| !task.is_finished()) {
        tokio::time::sleep(Duration::from_millis(15)).await;
        let killed: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1 AND state = 'active') AS k",
        )
        .bind(&application)
        .fetch_one(&killer)
        .await
        .unwrap();
        kills += killed;
    }
    let mut failed = 0;
    let mut succeeded = 0;
    let mut results = Vec::new();
    for task in tasks {
        let (stream, outcomes, reads_failed) = task.await.unwrap();
        failed += reads_failed;
        results.push((stream, outcomes));
    }
    eprintln!("connection loss: {kills} connections killed mid-statement");
    assert!(
        kills > 0,
        "no connection was killed: the test proved nothing"
    );

    // An append that reported `Connection` wrote nothing; one that reported `OutcomeUnknown` may
    // have (the connection died after its statement was sent).
    let stored_ids: std::collections::HashSet<uuid::Uuid> =
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT event_id FROM \"{}\".events",
            store.schema()
        )))
        .fetch_all(&killer)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let (mut nothing_written, mut unknown, mut unknown_stored) = (0, 0, 0);
    for (_, outcomes) in &results {
        for (events, outcome) in outcomes {
            let stored = events
                .iter()
                .filter(|e| stored_ids.contains(e.event_id.as_uuid()))
                .count();
            assert!(stored == 0 || stored == events.len(), "a batch was split");
            match outcome {
                Err(StoreError::Connection(_)) => {
                    nothing_written += 1;
                    assert_eq!(
                        stored, 0,
                        "an append that reported Connection wrote its events"
                    );
                }
                Err(_) => {
                    unknown += 1;
                    unknown_stored += usize::from(stored > 0);
                }
                Ok(_) => assert_eq!(stored, events.len(), "a reported success is stored"),
            }
        }
    }
    eprintln!(
        "connection loss: {nothing_written} appends failed with Connection, {unknown} with \
         OutcomeUnknown ({unknown_stored} of them stored)"
    );

    // Later calls succeed. A failed append is retried with the same event ids: it was either
    // not written (now it is) or written before the connection died (the retry says so and
    // returns the original result). Either way, each batch ends up stored exactly once, whole.
    for (stream, outcomes) in &results {
        for (events, outcome) in outcomes {
            let retried = store
                .append(stream, ExpectedVersion::Any, events.clone())
                .await
                .expect("appends succeed once the connections are back");
            match outcome {
                Ok(original) => {
                    succeeded += 1;
                    assert_eq!(
                        &retried, original,
                        "a reported success is stored as reported"
                    );
                }
                Err(_) => failed += 1,
            }
        }
    }
    eprintln!("connection loss: {succeeded} appends succeeded, {failed} calls failed");
    assert!(
        failed > 0,
        "no call failed: the kills missed every statement"
    );
    let all: Vec<_> = futures_util::TryStreamExt::try_collect::<Vec<_>>(
        cqrs_core::store::read_all_batched(&store, Position::START, EventTypes::All, 1000),
    )
    .await
    .unwrap();
    assert_eq!(all.len(), 4 * 150 * 20, "every batch stored exactly once");
    let by_id: HashMap<EventId, &cqrs_core::RecordedEvent> =
        all.iter().map(|e| (e.event_id, e)).collect();
    for (stream, outcomes) in &results {
        for (events, _) in outcomes {
            let stored: Vec<_> = events.iter().map(|e| by_id[&e.event_id]).collect();
            assert!(stored.iter().all(|e| &e.stream == stream));
            assert!(
                stored
                    .windows(2)
                    .all(|w| w[1].stream_version == w[0].stream_version.next()
                        && w[1].position.tx == w[0].position.tx),
                "a batch was split"
            );
        }
        assert_eq!(store.stream_version(stream).await.unwrap().get(), 150 * 20);
    }
    killer.close().await;
    drop_schema(&store).await;
}
