//! Driver errors as [`StoreError`]s.

use cqrs_core::stream::InvalidId;
use cqrs_core::StoreError;

/// The database's tables do not match what this version of the crate expects.
#[derive(Debug, thiserror::Error)]
#[error("schema `{schema}` does not match this version of cqrs-postgres (run `PostgresStore::migrate`, or check for a bad migration)")]
pub struct SchemaMismatch {
    /// The store's schema.
    pub schema: String,
    /// What PostgreSQL reported.
    #[source]
    pub source: sqlx::Error,
}

/// Maps a driver error to a [`StoreError`]: a lost, refused or exhausted connection becomes
/// [`StoreError::Connection`] (nothing was written; retry later), anything else
/// [`StoreError::Backend`]. The store's own appends report a connection lost once their write
/// was sent as [`StoreError::OutcomeUnknown`] instead.
///
/// Public so that code running its own queries next to the store (projection runners, outboxes)
/// reports failures the same way.
pub fn map_error(error: sqlx::Error) -> StoreError {
    if connection_failed(&error) {
        return StoreError::Connection(Box::new(error));
    }
    if let sqlx::Error::Database(db) = &error {
        if db.code().as_deref() == Some("22P05") {
            // PostgreSQL refuses `\u0000` in JSON it converts to text; normally caught before
            // sending (see `check_json`).
            return StoreError::InvalidId(InvalidId {
                what: "JSON value",
                reason: format!("PostgreSQL cannot store it: {}", db.message()),
            });
        }
    }
    StoreError::Backend(Box::new(error))
}

/// Like [`map_error`], but an undefined table or column (a missing migration, or a bad one)
/// names the schema and what to do.
pub(crate) fn map_error_in(schema: &str, error: sqlx::Error) -> StoreError {
    if let sqlx::Error::Database(db) = &error {
        // undefined_column, undefined_table, undefined_function, datatype_mismatch
        if matches!(
            db.code().as_deref(),
            Some("42703" | "42P01" | "42883" | "42804")
        ) {
            return StoreError::Backend(Box::new(SchemaMismatch {
                schema: schema.to_owned(),
                source: error,
            }));
        }
    }
    map_error(error)
}

/// For an error met once a write that commits by itself was sent (an autocommit append
/// statement, a `COMMIT`): a lost connection there lost the reply, not necessarily the write, so
/// it is [`StoreError::OutcomeUnknown`], never "nothing was written". Anything else as `map` says.
pub(crate) fn map_sent_write_error(
    error: sqlx::Error,
    map: impl FnOnce(sqlx::Error) -> StoreError,
) -> StoreError {
    if connection_failed(&error) {
        return StoreError::OutcomeUnknown(Box::new(error));
    }
    map(error)
}

/// [`is_connection_error`], noting a failed connection for the pool's checkout check (see
/// `pool.rs`): every driver error the store reports passes through here.
pub(crate) fn connection_failed(error: &sqlx::Error) -> bool {
    let failed = is_connection_error(error);
    if failed {
        crate::pool::connection_failed();
    }
    failed
}

pub(crate) fn is_connection_error(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // The server closed the connection under a running statement.
        sqlx::Error::Protocol(message) => {
            let message = message.to_ascii_lowercase();
            message.contains("closed") || message.contains("eof") || message.contains("connection")
        }
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // connection_exception class, admin/crash shutdown, cannot_connect_now,
            // too_many_connections
            code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// Whether the error is a unique violation (on the event id or the stream version: the append
/// looks the ids up either way, so which one does not matter).
pub(crate) fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// A unique violation on a stream version (`events_stream_version_key`): a concurrent
/// transaction wrote that version first. Not one on an event id, which is a re-sent event.
pub(crate) fn is_version_collision(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("23505")
            && db.constraint() == Some("events_stream_version_key"))
}

/// A value that fits the Rust type but not the column (e.g. a `u64` above `i64::MAX`).
pub(crate) fn out_of_range(what: &str, value: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("{what} {value} is out of range for PostgreSQL").into())
}
