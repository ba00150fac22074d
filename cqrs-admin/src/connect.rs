//! The database URL decides the backend.

use std::path::PathBuf;
use std::sync::Arc;

use cqrs_core::admin::StoreAdmin;
use cqrs_core::EventStore;
use cqrs_postgres::PostgresStore;
use cqrs_sqlite::SqliteStore;

use crate::AdminError;

/// An open event store, as the URL chose it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Connection {
    /// `postgres://…` or `postgresql://…`, in the schema of `--schema`.
    Postgres(PostgresStore),
    /// `sqlite:path`, `sqlite://path`, or a plain file path.
    Sqlite(SqliteStore),
}

impl Connection {
    /// The store's operator view.
    pub fn admin(&self) -> &dyn StoreAdmin {
        match self {
            Self::Postgres(store) => store,
            Self::Sqlite(store) => store,
        }
    }

    /// The store's log, shared.
    pub fn events(&self) -> Arc<dyn EventStore> {
        match self {
            Self::Postgres(store) => Arc::new(store.clone()),
            Self::Sqlite(store) => Arc::new(store.clone()),
        }
    }

    /// Applies the backend's migrations (an SQLite file is migrated when it opens).
    pub async fn migrate(&self) -> Result<(), AdminError> {
        match self {
            Self::Postgres(store) => Ok(store.migrate().await?),
            Self::Sqlite(_) => Ok(()),
        }
    }

    /// A name for the store in messages.
    pub fn describe(&self) -> String {
        match self {
            Self::Postgres(store) => format!("PostgreSQL, schema {}", store.schema()),
            Self::Sqlite(store) => format!("SQLite file {}", store.path().display()),
        }
    }
}

/// Which backend a URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Postgres(String),
    Sqlite(PathBuf),
}

/// Reads the URL: `postgres://` and `postgresql://` are PostgreSQL; `sqlite:` (with or without
/// `//`) and anything without a scheme are an SQLite file; every other scheme is refused.
pub(crate) fn target(url: &str) -> Result<Target, AdminError> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        return Ok(Target::Postgres(url.to_owned()));
    }
    if let Some(path) = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))
    {
        return Ok(Target::Sqlite(PathBuf::from(path)));
    }
    if url.contains("://") || url.is_empty() {
        return Err(AdminError::UnsupportedUrl { url: masked(url) });
    }
    Ok(Target::Sqlite(PathBuf::from(url)))
}

/// The URL with its password replaced, for messages.
fn masked(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &credentials[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Opens the store `url` names. `create` allows a new SQLite file (for `migrate`); otherwise a
/// missing file is an error, so that a mistyped path never creates an empty database.
pub async fn connect(url: &str, schema: &str, create: bool) -> Result<Connection, AdminError> {
    match target(url)? {
        Target::Postgres(url) => {
            let store = PostgresStore::connect(&url)
                .await
                .map_err(AdminError::Unreachable)?
                .with_schema(schema)?;
            Ok(Connection::Postgres(store))
        }
        Target::Sqlite(path) => {
            if !create && !path.is_file() {
                return Err(AdminError::NoSuchFile {
                    path: path.display().to_string(),
                });
            }
            let store = SqliteStore::open(&path)
                .await
                .map_err(AdminError::Unreachable)?;
            Ok(Connection::Sqlite(store))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_pick_the_backend() {
        assert!(matches!(
            target("postgres://u@h/db"),
            Ok(Target::Postgres(_))
        ));
        assert!(matches!(
            target("postgresql://u@h/db"),
            Ok(Target::Postgres(_))
        ));
        assert_eq!(
            target("sqlite:bank.db").ok(),
            Some(Target::Sqlite("bank.db".into()))
        );
        assert_eq!(
            target("sqlite:///tmp/bank.db").ok(),
            Some(Target::Sqlite("/tmp/bank.db".into()))
        );
        assert_eq!(
            target("/tmp/bank.db").ok(),
            Some(Target::Sqlite("/tmp/bank.db".into()))
        );
        assert!(matches!(
            target("redis://127.0.0.1/"),
            Err(AdminError::UnsupportedUrl { .. })
        ));
        assert_eq!(
            masked("mysql://ada:secret@host/db"),
            "mysql://ada:***@host/db"
        );
    }
}
