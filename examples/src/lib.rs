//! Example domains shared by the example binaries and their tests.
//!
//! Each binary runs in memory by default and on PostgreSQL when `DATABASE_URL` is set.

pub mod bank;
pub mod catalogue;
pub mod http;
pub mod orders;

/// The PostgreSQL store (schema `cqrs_examples`, migrated) when `DATABASE_URL` is set; `None` means
/// "run in memory".
pub async fn postgres_from_env(
) -> Result<Option<cqrs_postgres::PostgresStore>, cqrs_core::StoreError> {
    let Ok(url) = std::env::var("DATABASE_URL") else {
        return Ok(None);
    };
    let store = cqrs_postgres::PostgresStore::connect(&url)
        .await?
        .with_schema("cqrs_examples")?;
    store.migrate().await?;
    Ok(Some(store))
}

/// A suffix that makes ids unique per run, so examples can run repeatedly against one database.
pub fn run_id() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros().to_string())
        .unwrap_or_default()
}
