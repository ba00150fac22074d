//! `cqrs-postgres` against the real PostgreSQL at `DATABASE_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`).
//!
//! Every test runs on its own freshly migrated schema, through its own pool whose connections carry
//! the schema's name as `application_name` (so a test can kill exactly its own connections), and
//! tests run in parallel. An unreachable database fails the tests; nothing is skipped.

// Tests: failing assertions panic by design.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod bad_data;
mod cluster;
mod concurrency;
mod connection;
mod gaps;
mod group_commit;
mod grouped_loads;
mod hostile;
mod lost_reply;
mod process_manager;
mod projections;
mod read_database;
mod runner;
mod schema;
mod transactions;

use std::str::FromStr;
use std::time::Duration;

use cqrs_core::{EventId, Metadata, NewEvent};
use cqrs_postgres::PostgresStore;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

pub fn url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Prefix of every test schema; `pgt_<uuid v7>`, so the janitor can tell their age.
const PREFIX: &str = "pgt_";

/// A store on a new, migrated schema, through a pool of 4 connections.
pub async fn fresh_store() -> PostgresStore {
    fresh_store_with(4).await
}

/// A store on a new, migrated schema, through a pool of `connections` with the options
/// `PostgresStore::connect` uses.
pub async fn fresh_store_with(connections: u32) -> PostgresStore {
    let url = url();
    let schema = format!("{PREFIX}{}", uuid::Uuid::now_v7().simple());
    let options = PgConnectOptions::from_str(&url)
        .unwrap_or_else(|e| panic!("DATABASE_URL `{url}` is not a PostgreSQL URL: {e}"))
        .application_name(&schema);
    let pool = PostgresStore::pool_options()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "these tests need PostgreSQL at {url} (set DATABASE_URL); connecting failed: {e}"
            )
        });
    janitor(&pool).await;
    let store = PostgresStore::new(pool).with_schema(&schema).unwrap();
    store.migrate().await.unwrap();
    store
}

/// The database standing in for a read database on another server: `<DATABASE_URL's database>_read`
/// on the same server, created on first use. Each test uses its own schema in it.
pub async fn read_database_pool(connections: u32) -> sqlx::PgPool {
    let url = url();
    let options = PgConnectOptions::from_str(&url)
        .unwrap_or_else(|e| panic!("DATABASE_URL `{url}` is not a PostgreSQL URL: {e}"));
    let database = format!("{}_read", options.get_database().unwrap_or("postgres"));
    static CREATED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    CREATED
        .get_or_init(|| async {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options.clone())
                .await
                .unwrap();
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                    .bind(&database)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            if !exists {
                // Another test binary may create it at the same moment: a duplicate is fine.
                let created = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "CREATE DATABASE \"{database}\""
                )))
                .execute(&pool)
                .await;
                if let Err(sqlx::Error::Database(e)) = &created {
                    assert!(
                        matches!(e.code().as_deref(), Some("42P04" | "23505")),
                        "creating the read database: {e}"
                    );
                }
            }
            pool.close().await;
        })
        .await;
    let pool = PgPoolOptions::new()
        .max_connections(connections)
        .acquire_timeout(Duration::from_secs(30))
        .connect_with(options.database(&database))
        .await
        .unwrap();
    static CLEANED: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    CLEANED.get_or_init(|| drop_old_schemas(&pool)).await;
    pool
}

/// A new, empty schema in the read database (not migrated: `PostgresProjections::migrate` does).
pub async fn fresh_read_store(connections: u32) -> PostgresStore {
    let schema = format!("{PREFIX}{}", uuid::Uuid::now_v7().simple());
    PostgresStore::new(read_database_pool(connections).await)
        .with_schema(&schema)
        .unwrap()
}

/// Drops the test's schema (called at the end of tests that own their store; on failure the schema
/// stays for inspection, and the janitor removes it later).
pub async fn drop_schema(store: &PostgresStore) {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{}\" CASCADE",
        store.schema()
    )))
    .execute(store.pool())
    .await
    .unwrap();
}

/// Drops test schemas older than an hour (the conformance macro gives no hook to drop each one).
async fn janitor(pool: &sqlx::PgPool) {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| drop_old_schemas(pool)).await;
}

/// Drops this binary's test schemas older than an hour in `pool`'s database.
pub async fn drop_old_schemas(pool: &sqlx::PgPool) {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)")
            .bind(PREFIX)
            .fetch_all(pool)
            .await
            .unwrap_or_default();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    for name in names {
        let old = name
            .strip_prefix(PREFIX)
            .and_then(|id| uuid::Uuid::parse_str(id).ok())
            .and_then(|id| id.get_timestamp())
            .is_some_and(|ts| {
                let (secs, _) = ts.to_unix();
                now.as_secs().saturating_sub(secs) > 3600
            });
        if old {
            let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS \"{name}\" CASCADE"
            )))
            .execute(pool)
            .await;
        }
    }
}

/// An error and its sources on one line, as `anyhow`'s `{:#}` prints them.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// An event of type `event_type` with payload `{"n": n}`.
pub fn event(event_type: &str, n: i64) -> NewEvent {
    NewEvent {
        event_id: EventId::new(),
        event_type: event_type.to_owned(),
        schema_version: 1,
        payload: serde_json::json!({ "n": n }),
        metadata: Metadata::default(),
    }
}

/// `count` events of type `Added` (the conformance `Counter`'s event).
pub fn batch(count: usize) -> Vec<NewEvent> {
    (0..count).map(|n| event("Added", n as i64)).collect()
}

/// The samples the debugging recorder holds for histogram `name` (all label sets), taken: the
/// next call returns only what was recorded after this one.
pub fn histogram_samples(
    snapshotter: &metrics_util::debugging::Snapshotter,
    name: &str,
) -> Vec<f64> {
    snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| key.key().name() == name)
        .flat_map(|(.., value)| match value {
            metrics_util::debugging::DebugValue::Histogram(samples) => samples,
            _ => Vec::new(),
        })
        .map(|sample| sample.into_inner())
        .collect()
}

/// Inserts a row as another tool (or an older release) might have, bypassing the store.
#[allow(clippy::too_many_arguments)] // one argument per column: reads like the row it writes
pub async fn insert_raw(
    store: &PostgresStore,
    stream_type: &str,
    stream_id: &str,
    version: i64,
    event_type: &str,
    schema_version: i32,
    payload: &str,
    metadata: &str,
) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "INSERT INTO \"{}\".events
            (stream_type, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
         VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb) RETURNING position",
        store.schema()
    )))
    .bind(stream_type)
    .bind(stream_id)
    .bind(version)
    .bind(uuid::Uuid::now_v7())
    .bind(event_type)
    .bind(schema_version)
    .bind(payload)
    .bind(metadata)
    .fetch_one(store.pool())
    .await
    .unwrap()
}

mod conformance {
    use super::fresh_store;

    cqrs_core::backend_conformance_tests!(fresh_store);
    cqrs_core::admin_conformance_tests!(fresh_store);

    async fn fresh_projections() -> cqrs_postgres::PostgresProjections {
        cqrs_postgres::PostgresProjections::new(fresh_store().await)
    }
    async fn fresh_inline() -> (
        cqrs_postgres::PostgresStore,
        cqrs_core::conformance::projections::Recorder<sqlx::PgConnection>,
    ) {
        let recorder = cqrs_core::conformance::projections::Recorder::default();
        (fresh_store().await.with_inline(recorder.clone()), recorder)
    }
    cqrs_core::projection_conformance_tests!(
        fresh_projections,
        context = sqlx::PgConnection,
        inline = fresh_inline
    );
}

/// Every public future of the crate can be spawned (`Send`): a compile-time check.
#[allow(dead_code, clippy::let_underscore_future)]
fn public_futures_are_send(
    store: PostgresStore,
    projections: cqrs_postgres::PostgresProjections,
    mut conn: sqlx::PgConnection,
    mut listener: cqrs_postgres::AppendListener,
) {
    fn send<T: Send>(_: T) {}
    send(PostgresStore::connect("postgres://"));
    send(PostgresStore::open("postgres://"));
    send(async move {
        let _ = store.migrate().await;
        let _ = store.horizon().await;
        let _ = store.listen().await;
        let _ = store.load_checkpoint_in(&mut conn, "n").await;
        let _ = store
            .save_checkpoint_in(&mut conn, "n", None, cqrs_core::Position::START)
            .await;
        let stream = cqrs_core::StreamId::new("a", "b");
        let _ = store
            .append_in(&mut conn, &stream, cqrs_core::ExpectedVersion::Any, vec![])
            .await;
        let _ = projections.skipped_events("n").await;
        let _ = projections
            .first_delivery(&mut conn, "c", EventId::new())
            .await;
        let _ = projections.switch_view("v", "t").await;
        let _ = projections.promote("n", "n.next", &[("v", "t")]).await;
        let _ = projections.record_failure("n", None).await;
        let _ = projections.last_failure("n").await;
        let _ = listener.recv().await;
    });
    send(async move {
        use cqrs_core::admin::StoreAdmin;
        let store = PostgresStore::new(sqlx::PgPool::connect_lazy("postgres://").unwrap());
        let _ = store.stream_types().await;
        let _ = store.list_streams("t", None, 1).await;
        let _ = store.checkpoints().await;
        let _ = store.lease_holder("n").await;
        let _ = store.skipped("n").await;
        let _ = store.last_failure("n").await;
        let _ = store.horizon_report().await;
    });
}
