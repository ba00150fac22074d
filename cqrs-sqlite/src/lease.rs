//! One active runner per projection, across processes: an exclusive lock on a small lock file
//! next to the database, one per projection name, held by a dedicated connection.
//!
//! The lock is SQLite's own file lock (`BEGIN EXCLUSIVE` on an otherwise unused database file):
//! the operating system releases it when the connection closes or the process dies, however it
//! dies, so a crashed runner never leaves a stale lease behind. Connections of one process
//! exclude each other too (SQLite tracks its locks per file across the process's connections).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cqrs_core::backend::Lease;
use cqrs_core::StoreError;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};

use crate::error::Errors;

/// How often a held lease re-checks its connection (at most; between checks it is assumed held).
const LEASE_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// A lease check that takes longer than this counts as lost.
const LEASE_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// The lock file of projection `name`: `<database>.lease-<hash of name>`. A stable hash (FNV-1a,
/// the same in every build and process), since names may hold any character a file name cannot.
/// Two names with the same hash would merely exclude each other.
pub(crate) fn lock_path(database: &Path, name: &str) -> PathBuf {
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    let mut file = database.as_os_str().to_owned();
    file.push(format!(".lease-{hash:016x}"));
    PathBuf::from(file)
}

/// Tries to take the lease; `None` if another connection holds it.
pub(crate) async fn acquire(
    database: &Path,
    name: &str,
    errors: &Errors,
) -> Result<Option<Box<dyn Lease>>, StoreError> {
    let options = SqliteConnectOptions::new()
        .filename(lock_path(database, name))
        .create_if_missing(true)
        .busy_timeout(Duration::ZERO);
    let mut conn = match options.connect().await {
        Ok(conn) => conn,
        Err(error) if is_busy(&error) => return Ok(None),
        Err(error) => return Err(errors.map(error)),
    };
    match sqlx::raw_sql("BEGIN EXCLUSIVE").execute(&mut conn).await {
        Ok(_) => Ok(Some(Box::new(FileLease {
            conn: Some(conn),
            checked: Instant::now(),
        }))),
        Err(error) => {
            let _ = conn.close().await;
            if is_busy(&error) {
                Ok(None)
            } else {
                Err(errors.map(error))
            }
        }
    }
}

fn is_busy(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if db.code().and_then(|c| c.parse::<i64>().ok()).is_some_and(|c| c & 0xff == 5))
}

/// The lock, held while its connection lives (dropped here, or the process dies).
struct FileLease {
    conn: Option<SqliteConnection>,
    checked: Instant,
}

#[async_trait::async_trait]
impl Lease for FileLease {
    async fn is_held(&mut self) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        if self.checked.elapsed() < LEASE_CHECK_INTERVAL {
            return true;
        }
        match tokio::time::timeout(LEASE_CHECK_TIMEOUT, conn.ping()).await {
            Ok(Ok(())) => {
                self.checked = Instant::now();
                true
            }
            _ => {
                tracing::warn!("projection lease connection lost");
                self.conn = None;
                false
            }
        }
    }
}
