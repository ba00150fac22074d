//! Driver errors as [`StoreError`]s, and the failures specific to an embedded file.

use std::path::PathBuf;
use std::time::Duration;

use cqrs_core::StoreError;

/// What went wrong with the database file itself. Carried inside [`StoreError::Backend`] or
/// [`StoreError::Connection`] (downcast the source to read it). Every caller of a commit group
/// that failed as a whole gets the same variant.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum SqliteError {
    /// The file exists but is not an SQLite database, or it was damaged (truncated, overwritten).
    /// The store refuses it without writing anything to it.
    #[error("`{path}` is not a usable SQLite database ({detail}); it was left untouched")]
    NotADatabase {
        /// The file.
        path: PathBuf,
        /// What SQLite or the store found.
        detail: String,
    },
    /// The file (or its directory) cannot be written, or the store was opened read-only.
    #[error("`{path}` is read-only: {detail}")]
    ReadOnly {
        /// The file.
        path: PathBuf,
        /// Why.
        detail: String,
    },
    /// Another connection (usually another process) kept the database locked for longer than
    /// the configured busy timeout. Nothing was written; retrying later may succeed.
    #[error("the database is locked by another writer and stayed locked for the busy timeout ({timeout:?}); nothing was written")]
    Busy {
        /// The configured busy timeout.
        timeout: Duration,
    },
    /// The disk (or the file system's quota) is full. Nothing was written.
    #[error("the disk is full; nothing was written")]
    DiskFull,
    /// The store's writer task is gone (the runtime that opened the store shut down).
    #[error("the store's writer stopped (was the runtime that opened the store shut down?)")]
    WriterStopped,
}

/// SQLite's primary result codes the store distinguishes.
mod code {
    pub const BUSY: i64 = 5;
    pub const LOCKED: i64 = 6;
    pub const READONLY: i64 = 8;
    pub const IOERR: i64 = 10;
    pub const CORRUPT: i64 = 11;
    pub const FULL: i64 = 13;
    pub const CANTOPEN: i64 = 14;
    pub const CONSTRAINT: i64 = 19;
    pub const NOTADB: i64 = 26;
}

/// The primary result code of a database error (SQLite's extended code modulo 256).
fn primary_code(error: &sqlx::Error) -> Option<i64> {
    match error {
        sqlx::Error::Database(db) => db
            .code()
            .and_then(|code| code.parse::<i64>().ok())
            .map(|code| code & 0xff),
        _ => None,
    }
}

/// How the store maps driver errors; knows the file and the busy timeout to name them.
#[derive(Debug, Clone)]
pub(crate) struct Errors {
    pub path: PathBuf,
    pub busy_timeout: Duration,
}

impl Errors {
    /// A driver error as a [`StoreError`]: lost connections, a lock held past the busy timeout,
    /// a full disk and I/O errors are [`StoreError::Connection`] (nothing was written; retry
    /// later), a damaged or read-only file is a [`SqliteError`] in [`StoreError::Backend`],
    /// anything else [`StoreError::Backend`].
    pub fn map(&self, error: sqlx::Error) -> StoreError {
        if is_connection_error(&error) {
            return StoreError::Connection(Box::new(error));
        }
        match primary_code(&error) {
            Some(code::BUSY | code::LOCKED) => {
                StoreError::Connection(Box::new(SqliteError::Busy {
                    timeout: self.busy_timeout,
                }))
            }
            Some(code::FULL) => StoreError::Connection(Box::new(SqliteError::DiskFull)),
            Some(code::IOERR | code::CANTOPEN) => StoreError::Connection(Box::new(error)),
            Some(code::CORRUPT | code::NOTADB) => {
                StoreError::Backend(Box::new(SqliteError::NotADatabase {
                    path: self.path.clone(),
                    detail: error.to_string(),
                }))
            }
            Some(code::READONLY) => StoreError::Backend(Box::new(SqliteError::ReadOnly {
                path: self.path.clone(),
                detail: error.to_string(),
            })),
            _ => StoreError::Backend(Box::new(error)),
        }
    }

    /// For an error met once a `COMMIT` was sent: SQLite reports a commit it could not make
    /// (a lock, a full disk) as such, and then nothing was written; an I/O error or a lost
    /// worker thread may come after the commit record reached the log, so the outcome is
    /// [`StoreError::OutcomeUnknown`].
    pub fn map_commit(&self, error: sqlx::Error) -> StoreError {
        match primary_code(&error) {
            Some(code::BUSY | code::LOCKED | code::FULL | code::READONLY) => self.map(error),
            Some(code::IOERR) => StoreError::OutcomeUnknown(Box::new(error)),
            _ if is_connection_error(&error) => StoreError::OutcomeUnknown(Box::new(error)),
            _ => self.map(error),
        }
    }
}

/// Errors of the connection itself (its worker thread, its file handle), not of a statement.
pub(crate) fn is_connection_error(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

/// Whether a handler's error means the storage failed rather than the event (then it is
/// retried, never offered as a poison event): a lost connection, a lock held too long, a full
/// disk, an I/O error.
pub(crate) fn is_storage_failure(error: &sqlx::Error) -> bool {
    is_connection_error(error)
        || matches!(
            primary_code(error),
            Some(code::BUSY | code::LOCKED | code::FULL | code::IOERR | code::CANTOPEN)
        )
}

/// A unique or primary-key violation (a stored event id, or a version another writer took).
pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if db.kind() == sqlx::error::ErrorKind::UniqueViolation)
        || (primary_code(error) == Some(code::CONSTRAINT)
            && error.to_string().contains("UNIQUE constraint failed"))
}

/// A value that fits the Rust type but not SQLite's 64-bit signed integers.
pub(crate) fn out_of_range(what: &str, value: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{what} {value} is out of range for SQLite").into())
}

/// A `u64` as SQLite's `INTEGER`.
pub(crate) fn to_i64(what: &str, value: u64) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| out_of_range(what, value))
}
