//! Migrations, the configurable schema, and the immutability of events.

use cqrs_core::{EventStore, EventTypes, ExpectedVersion, Position, StoreError, StreamId};
use cqrs_postgres::PostgresStore;

use crate::{batch, drop_schema, fresh_store};

#[tokio::test]
async fn events_cannot_be_updated_deleted_or_truncated() {
    let store = fresh_store().await;
    let stream = StreamId::new("ledger", "x");
    let written = store
        .append(&stream, ExpectedVersion::NoStream, batch(2))
        .await
        .unwrap();
    let events = format!("\"{}\".events", store.schema());
    for statement in [
        format!("UPDATE {events} SET payload = '{{}}'"),
        format!("UPDATE {events} SET event_type = 'x' WHERE false"),
        format!("DELETE FROM {events}"),
        format!("DELETE FROM {events} WHERE position = -1"),
        format!("TRUNCATE {events}"),
    ] {
        let error = sqlx::query(sqlx::AssertSqlSafe(statement.as_str()))
            .execute(store.pool())
            .await
            .expect_err(&statement);
        assert!(
            error.to_string().contains("events are immutable"),
            "{statement}: {error}"
        );
    }
    let read = store
        .read_stream(&stream, cqrs_core::StreamVersion::new(1), 10)
        .await
        .unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!(read[1].position, written.position);
    assert_eq!(
        read[0].payload.to_value().unwrap(),
        serde_json::json!({ "n": 0 })
    );
    drop_schema(&store).await;
}

#[tokio::test]
async fn migrate_is_idempotent_and_safe_to_run_concurrently() {
    let store = fresh_store().await;
    store.migrate().await.unwrap();
    // Three more processes' worth, at once, on a new schema.
    let schema = format!("pgt_{}", uuid::Uuid::now_v7().simple());
    let other = PostgresStore::new(store.pool().clone())
        .with_schema(&schema)
        .unwrap();
    let (a, b, c) = tokio::join!(other.migrate(), other.migrate(), other.migrate());
    a.unwrap();
    b.unwrap();
    c.unwrap();
    let stream = StreamId::new("s", "1");
    other
        .append(&stream, ExpectedVersion::NoStream, batch(1))
        .await
        .unwrap();
    // Schemas are isolated from each other.
    assert_eq!(
        store
            .count_after(Position::START, EventTypes::All)
            .await
            .unwrap(),
        0
    );
    let applied: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{schema}\"._sqlx_migrations"
    )))
    .fetch_one(store.pool())
    .await
    .unwrap();
    let migrations = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"))
        .unwrap()
        .count();
    assert_eq!(
        applied as usize, migrations,
        "every migration is applied once, and the history lives in the schema"
    );
    drop_schema(&other).await;
    drop_schema(&store).await;
}

#[tokio::test]
async fn hostile_schema_names_are_rejected() {
    let store = fresh_store().await;
    for bad in [
        "",
        "Upper",
        "x\"; DROP SCHEMA public CASCADE; --",
        "with space",
        "1starts_with_digit",
        "pg_catalog",
        "pg_toast",
        "pg_temp_1",
        "information_schema",
        "ünïcode",
        &"x".repeat(cqrs_postgres::MAX_SCHEMA_LEN + 1),
    ] {
        match store.clone().with_schema(bad) {
            Err(StoreError::InvalidId(e)) => assert_eq!(e.what, "schema name"),
            other => panic!("schema {bad:?} accepted: {other:?}"),
        }
    }
    let longest = "x".repeat(cqrs_postgres::MAX_SCHEMA_LEN);
    let ok = store.clone().with_schema(&longest).unwrap();
    assert_eq!(ok.notification_channel().len(), 63, "fits an identifier");
    drop_schema(&store).await;
}

#[tokio::test]
async fn an_unmigrated_schema_is_a_typed_error_that_says_what_to_do() {
    let store = fresh_store().await;
    let missing = store.clone().with_schema("pgt_never_migrated").unwrap();
    let error = missing
        .append(&StreamId::new("s", "1"), ExpectedVersion::Any, batch(1))
        .await
        .unwrap_err();
    match &error {
        StoreError::Backend(inner) => {
            assert!(
                inner
                    .downcast_ref::<cqrs_postgres::SchemaMismatch>()
                    .is_some(),
                "{error}"
            );
        }
        other => panic!("{other:?}"),
    }
    assert!(error.to_string().contains("migrate"), "{error}");
    drop_schema(&store).await;
}

#[tokio::test]
async fn first_delivery_refuses_consumer_names_it_cannot_store() {
    let store = fresh_store().await;
    let projections = cqrs_postgres::PostgresProjections::new(store.clone());
    let event = cqrs_core::EventId::new();
    let mut tx = store.pool().begin().await.unwrap();
    for bad in [
        String::new(),
        "nul\0inside".to_owned(),
        "x".repeat(cqrs_postgres::MAX_CHECKPOINT_NAME_LEN + 1),
        "x".repeat(1024 * 1024),
    ] {
        match projections.first_delivery(&mut tx, &bad, event).await {
            Err(StoreError::InvalidId(e)) => assert_eq!(e.what, "consumer name"),
            other => panic!("consumer name of {} bytes: {other:?}", bad.len()),
        }
    }
    // Refused before anything was sent: the transaction is still usable.
    let longest = "x".repeat(cqrs_postgres::MAX_CHECKPOINT_NAME_LEN);
    for consumer in ["mailer", longest.as_str()] {
        assert!(projections
            .first_delivery(&mut tx, consumer, event)
            .await
            .unwrap());
        assert!(!projections
            .first_delivery(&mut tx, consumer, event)
            .await
            .unwrap());
    }
    tx.rollback().await.unwrap();
    drop_schema(&store).await;
}
