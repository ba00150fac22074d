//! Pools, fresh schemas and the raw baseline's table.

use cqrs_postgres::PostgresStore;
use sqlx::postgres::{PgPool, PgPoolOptions};

use crate::BenchError;

/// Connections in every contender's pool (ours, raw SQL and cqrs-es alike): one per client at the
/// highest concurrency measured.
pub const POOL_SIZE: u32 = 8;

/// Fails early with a clear message if the database is unreachable.
pub async fn check(url: &str) -> Result<(), BenchError> {
    let pool = PgPoolOptions::new().max_connections(1).connect(url).await?;
    sqlx::query("SELECT 1").execute(&pool).await?;
    pool.close().await;
    Ok(())
}

/// A pool of [`POOL_SIZE`] connections with sqlx's default options, all opened before it is
/// returned (so no benchmark times a connection handshake).
pub async fn pool(url: &str) -> Result<PgPool, BenchError> {
    pool_with(PgPoolOptions::new(), url).await
}

/// [`pool`], from `options`.
async fn pool_with(options: PgPoolOptions, url: &str) -> Result<PgPool, BenchError> {
    let pool = options.max_connections(POOL_SIZE).connect(url).await?;
    let mut held = Vec::new();
    for _ in 0..POOL_SIZE {
        held.push(pool.acquire().await?);
    }
    drop(held);
    Ok(pool)
}

/// A schema name unique to this process: `bench_<what>_<pid>`.
pub fn schema_name(what: &str) -> String {
    let clean: String = what
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    format!("bench_{clean}_{}", std::process::id())
}

/// Drops `schema` (if it exists) and everything in it.
pub async fn drop_schema(pool: &PgPool, schema: &str) -> Result<(), BenchError> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(pool)
    .await?;
    Ok(())
}

/// Drops and recreates `schema`, empty.
pub async fn fresh_schema(pool: &PgPool, schema: &str) -> Result<(), BenchError> {
    drop_schema(pool, schema).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA \"{schema}\"")))
        .execute(pool)
        .await?;
    Ok(())
}

/// Our store on a fresh, migrated schema, with its own pool of [`POOL_SIZE`] and otherwise the
/// options `PostgresStore::connect` uses.
pub async fn our_store(url: &str, schema: &str) -> Result<PostgresStore, BenchError> {
    let pool = pool_with(PostgresStore::pool_options(), url).await?;
    drop_schema(&pool, schema).await?;
    let store = PostgresStore::new(pool).with_schema(schema)?;
    store.migrate().await?;
    Ok(store)
}

/// The raw baselines' table: the least that does the job (a global position, the stream's version
/// made unique so concurrent writers cannot both write one, the event's type and JSON). No event-id
/// uniqueness, no transaction-id column, no type index, no trigger: strictly less work than ours.
pub async fn raw_table(pool: &PgPool, schema: &str) -> Result<String, BenchError> {
    fresh_schema(pool, schema).await?;
    let table = format!("\"{schema}\".events");
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE {table} (
            position       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            stream_type    text   NOT NULL,
            stream_id      text   NOT NULL,
            stream_version bigint NOT NULL,
            event_id       uuid   NOT NULL,
            event_type     text   NOT NULL,
            schema_version integer NOT NULL,
            payload        json   NOT NULL,
            metadata       json   NOT NULL,
            recorded_at    timestamptz NOT NULL DEFAULT now(),
            UNIQUE (stream_type, stream_id, stream_version)
        )"
    )))
    .execute(pool)
    .await?;
    Ok(table)
}
