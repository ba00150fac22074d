//! What the projection runner promises on PostgreSQL beyond the conformance suite: catch-ups that
//! are complete despite a held visibility horizon, unreadable rows that fail at their own position,
//! and lost connections that are never blamed on an event.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cqrs_core::conformance::projections::Recorder;
use cqrs_core::subscription::{
    FailureCause, ProjectionFailure, ProjectionRunner, ProjectionState, RunError, RunnerConfig,
};
use cqrs_core::{
    EventId, EventStore, ExpectedVersion, Metadata, NewEvent, Position, Projection,
    ProjectionError, RecordedEvent, StoreError, StreamId,
};
use cqrs_postgres::{PostgresProjections, PostgresStore};
use sqlx::postgres::PgConnection;
use sqlx::Connection;

use crate::{drop_schema, fresh_store, insert_raw, url};

fn recorded() -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: "Recorded".to_owned(),
        schema_version: 1,
        payload: serde_json::json!({}),
        metadata: Metadata::default(),
    }
}

async fn append(store: &PostgresStore, stream: &str, count: usize) -> Vec<Position> {
    let stream = StreamId::new("runner", stream);
    let mut positions = Vec::new();
    for _ in 0..count {
        let written = store
            .append(&stream, ExpectedVersion::Any, vec![recorded()])
            .await
            .unwrap();
        positions.push(written.position);
    }
    positions
}

/// A transaction on its own connection that has taken a transaction id: it holds the
/// cluster's visibility horizon below every event appended after it, until it ends.
async fn hold_horizon() -> PgConnection {
    let mut holder = PgConnection::connect(&url()).await.unwrap();
    sqlx::raw_sql("BEGIN; SELECT pg_current_xact_id();")
        .execute(&mut holder)
        .await
        .unwrap();
    holder
}

fn config() -> RunnerConfig {
    RunnerConfig::builder()
        .batch_size(100)
        .poll_interval(Duration::from_millis(50))
        .initial_backoff(Duration::from_millis(20))
        .max_backoff(Duration::from_millis(100))
        .standby_interval(Duration::from_millis(50))
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catch_up_and_rebuild_wait_for_events_held_above_the_horizon() {
    let store = fresh_store().await;
    let mut holder = hold_horizon().await;
    let positions = append(&store, "held", 3).await;
    // The events are committed, but unreadable until the holder ends; it ends after a while.
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
    });
    let recorder = Recorder::<PgConnection>::default();
    ProjectionRunner::new(recorder.clone(), PostgresProjections::new(store.clone()))
        .with_config(config())
        .catch_up()
        .await
        .unwrap();
    assert_eq!(
        recorder.applied(),
        positions,
        "catch_up returned before applying what was committed before it"
    );
    release.await.unwrap();

    let mut holder = hold_horizon().await;
    let more = append(&store, "held", 2).await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        sqlx::raw_sql("COMMIT").execute(&mut holder).await.unwrap();
    });
    let rebuilt = Recorder::<PgConnection>::default();
    ProjectionRunner::new(rebuilt.clone(), PostgresProjections::new(store.clone()))
        .with_config(config())
        .rebuild(rebuilt.clone(), || async { Ok(()) }, |_| {})
        .await
        .unwrap();
    assert_eq!(rebuilt.applied(), [positions, more].concat());
    release.await.unwrap();
    drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn catch_up_fails_naming_what_holds_the_horizon_instead_of_returning_incomplete() {
    let store = fresh_store()
        .await
        .with_horizon_wait(Duration::from_millis(200));
    let mut holder = hold_horizon().await;
    let positions = append(&store, "held", 2).await;
    let recorder = Recorder::<PgConnection>::default();
    let outcome = ProjectionRunner::new(recorder.clone(), PostgresProjections::new(store.clone()))
        .with_config(config())
        .catch_up()
        .await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    match outcome {
        Err(RunError::Store(StoreError::NotYetReadable {
            position, held_by, ..
        })) => {
            assert_eq!(position, positions[1]);
            assert!(held_by.contains("transaction"), "{held_by}");
        }
        other => panic!("expected NotYetReadable, got {other:?}"),
    }
    assert!(recorder.applied().is_empty());
    drop_schema(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_row_fails_at_its_position_after_the_rows_ahead_of_it_commit() {
    let store = fresh_store().await;
    let ahead = append(&store, "good", 1).await[0];
    // A negative schema version: stored fine, unreadable as an envelope.
    let bad = insert_raw(&store, "runner", "bad", 1, "Recorded", -1, "{}", "{}").await;
    let behind = append(&store, "good", 1).await[0];
    let projections = PostgresProjections::new(store.clone());
    let recorder = Recorder::<PgConnection>::default();
    let handle = ProjectionRunner::new(recorder.clone(), projections.clone())
        .with_config(config())
        .spawn();
    let mut status = handle.watch_status();
    let failed = tokio::time::timeout(
        Duration::from_secs(20),
        status.wait_for(|s| s.state == ProjectionState::Failed && s.last_error.is_some()),
    )
    .await
    .unwrap()
    .unwrap()
    .clone();
    let failure = failed.last_error.clone().unwrap();
    assert_eq!(failure.cause, FailureCause::CorruptEvent, "{failure:?}");
    let at = failure
        .position
        .expect("the failure names the row's position");
    assert_eq!(at.sequence, bad as u64);
    assert!(failure.skippable());
    assert_eq!(failed.checkpoint, Some(ahead), "the row ahead committed");
    assert_eq!(recorder.applied(), vec![ahead]);

    handle.skip(at).await;
    handle
        .wait_for(behind, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(recorder.applied(), vec![ahead, behind]);
    let skipped = projections
        .skipped_events(Recorder::<PgConnection>::NAME)
        .await
        .unwrap();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].position, at);
    assert_eq!(skipped[0].event_type.as_deref(), Some("Recorded"));
    handle.stop().await;
    drop_schema(&store).await;
}

/// Applies `Recorded` events by counting them in a table; the first call kills its own
/// connection and reports the failure the way many handlers would, as a plain message.
#[derive(Debug, Clone)]
struct KillsItsConnectionOnce {
    killed: Arc<AtomicBool>,
    table: String,
}

impl Projection for KillsItsConnectionOnce {
    const NAME: &'static str = "kills_its_connection_once";
    const EVENT_TYPES: &'static [&'static str] = &["Recorded"];
    type Context = PgConnection;

    async fn handle<'a>(
        &'a mut self,
        event: &'a RecordedEvent,
        db: &'a mut PgConnection,
    ) -> Result<(), ProjectionError> {
        let failed = |source: sqlx::Error| ProjectionError::Handler {
            projection: Self::NAME,
            event_type: event.event_type.clone(),
            position: event.position,
            source: format!("the query failed: {source}").into(),
        };
        if !self.killed.swap(true, Ordering::SeqCst) {
            sqlx::query("SELECT pg_terminate_backend(pg_backend_pid())")
                .execute(&mut *db)
                .await
                .map_err(failed)?;
        }
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} (position) VALUES ($1)",
            self.table
        )))
        .bind(i64::try_from(event.position.sequence).unwrap())
        .execute(&mut *db)
        .await
        .map_err(failed)?;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_lost_inside_a_handler_is_retried_and_never_offered_as_a_poison_event() {
    let store = fresh_store().await;
    let table = format!("\"{}\".\"applied\"", store.schema());
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (position bigint PRIMARY KEY)"
    )))
    .execute(store.pool())
    .await
    .unwrap();
    let positions = append(&store, "lost", 2).await;
    let projection = KillsItsConnectionOnce {
        killed: Arc::default(),
        table: table.clone(),
    };
    let handle = ProjectionRunner::new(projection, PostgresProjections::new(store.clone()))
        .with_config(config())
        .spawn();
    let mut status = handle.watch_status();
    let failures = tokio::spawn(async move {
        let mut seen: Vec<ProjectionFailure> = Vec::new();
        while status.changed().await.is_ok() {
            let failure = status.borrow_and_update().last_error.clone();
            if let Some(failure) = failure {
                if !seen.contains(&failure) {
                    seen.push(failure);
                }
            }
        }
        seen
    });
    handle
        .wait_for(positions[1], Duration::from_secs(20))
        .await
        .unwrap();
    handle.stop().await;
    let failures = failures.await.unwrap();
    assert!(!failures.is_empty(), "the lost connection is reported");
    for failure in &failures {
        assert_eq!(failure.cause, FailureCause::Store, "{failure:?}");
        assert_eq!(failure.position, None, "{failure:?}");
        assert!(!failure.skippable(), "{failure:?}");
    }
    let applied: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT position FROM {table} ORDER BY position"
    )))
    .fetch_all(store.pool())
    .await
    .unwrap();
    let expected: Vec<i64> = positions
        .iter()
        .map(|p| i64::try_from(p.sequence).unwrap())
        .collect();
    assert_eq!(applied, expected, "both events applied once, none skipped");
    drop_schema(&store).await;
}
