//! Example domains shared by the example binaries and their tests.
//!
//! Each binary runs on an SQLite file by default (durable: a second run continues where the first
//! left off), on PostgreSQL when `DATABASE_URL` is a `postgres://` URL, and in memory with
//! `--memory`. See [`open_store`].

pub mod bank;
pub mod catalogue;
pub mod http;
pub mod orders;
pub mod orders_read_models;
pub mod restart;
pub mod telemetry;

/// The PostgreSQL store (schema `cqrs_examples`, migrated) when `DATABASE_URL` is a PostgreSQL
/// URL (`postgres://` or `postgresql://`); `None` otherwise.
pub async fn postgres_from_env(
) -> Result<Option<cqrs_postgres::PostgresStore>, cqrs_core::StoreError> {
    let Some(url) = std::env::var("DATABASE_URL")
        .ok()
        .filter(|url| url.starts_with("postgres://") || url.starts_with("postgresql://"))
    else {
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

/// The store an example binary runs on.
pub enum Store {
    /// `--memory`: gone when the process ends.
    Memory(cqrs_core::InMemoryStore),
    /// The default: an SQLite file that keeps everything between runs.
    Sqlite(cqrs_sqlite::SqliteStore),
    /// `DATABASE_URL=postgres://…`.
    Postgres(cqrs_postgres::PostgresStore),
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Store::Memory(_) => f.write_str("Memory"),
            Store::Sqlite(store) => f.debug_tuple("Sqlite").field(store).finish(),
            Store::Postgres(store) => f.debug_tuple("Postgres").field(store).finish(),
        }
    }
}

/// Where example `name` keeps its SQLite file: `DATABASE_URL=sqlite:<path>` if given, else
/// `<OS temp dir>/cqrs-examples/<name>.db` (outside the source tree, and writable from a fresh
/// clone).
pub fn sqlite_path(name: &str) -> std::path::PathBuf {
    if let Some(path) = std::env::var("DATABASE_URL").ok().and_then(|url| {
        url.strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .map(std::path::PathBuf::from)
    }) {
        return path;
    }
    std::env::temp_dir()
        .join("cqrs-examples")
        .join(format!("{name}.db"))
}

/// Picks the store for example `name` from the command line and the environment (`--memory`,
/// `DATABASE_URL`, else the SQLite file of [`sqlite_path`]) and says on `out` which one, and for
/// an SQLite file whether it continues earlier runs.
pub async fn open_store(
    name: &str,
    out: &mut impl std::io::Write,
) -> Result<Store, Box<dyn std::error::Error + Send + Sync>> {
    use cqrs_core::EventStore;
    if std::env::args().any(|arg| arg == "--memory") {
        writeln!(out, "running in memory (--memory): nothing is kept")?;
        return Ok(Store::Memory(cqrs_core::InMemoryStore::new()));
    }
    if let Some(store) = postgres_from_env().await? {
        writeln!(out, "running on PostgreSQL, schema {}", store.schema())?;
        return Ok(Store::Postgres(store));
    }
    let path = sqlite_path(name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let store = cqrs_sqlite::SqliteStore::open(&path).await?;
    match store.head().await? {
        None => writeln!(out, "running on a new SQLite file {}", path.display())?,
        Some(head) => writeln!(
            out,
            "running on the SQLite file {}: continuing after the {} events of earlier runs \
             (last position {head}); `--memory` runs in memory",
            path.display(),
            store
                .count_after(cqrs_core::Position::START, cqrs_core::EventTypes::All)
                .await?
        )?,
    }
    Ok(Store::Sqlite(store))
}
