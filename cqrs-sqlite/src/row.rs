//! Rows back into core types. Nothing here panics on what the file contains: an unreadable row
//! becomes [`StoreError::CorruptEvent`] naming its position.

use chrono::{DateTime, Utc};
use cqrs_core::backend::StoredEventRef;
use cqrs_core::{EventId, Position, RawJson, RecordedEvent, StoreError, StreamId, StreamVersion};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

/// The position scheme: an event's position is its row's `position` (the AUTOINCREMENT key) in
/// both parts of the core's `(tx, sequence)` pair. Writers commit one at a time in position
/// order, so the row key alone orders the log; `tx` carries it too, so positions compare
/// correctly with the core's ordering (transaction first).
pub(crate) fn position_of(key: i64) -> Result<Position, StoreError> {
    let key = u64::try_from(key)
        .map_err(|_| StoreError::Backend(format!("negative position {key}").into()))?;
    Ok(Position::new(key, key))
}

/// The smallest row key strictly after `after` in the core's order (`(tx, sequence)` compared
/// lexicographically, a row at key `k` being `(k, k)`).
pub(crate) fn first_key_after(after: Position) -> i64 {
    let key = if after.sequence < after.tx {
        after.tx
    } else {
        after.tx.saturating_add(1)
    };
    i64::try_from(key).unwrap_or(i64::MAX)
}

/// The largest row key at or before `until`.
pub(crate) fn last_key_until(until: Position) -> i64 {
    let key = if until.sequence >= until.tx {
        until.tx
    } else {
        until.tx.saturating_sub(1)
    };
    i64::try_from(key).unwrap_or(i64::MAX)
}

fn corrupt(position: Position, reason: impl std::fmt::Display) -> StoreError {
    StoreError::CorruptEvent {
        position,
        reason: reason.to_string(),
    }
}

/// The index of each column of `sql::columns!`, in its order.
mod col {
    pub const POSITION: usize = 0;
    pub const STREAM_TYPE: usize = 1;
    pub const STREAM_ID: usize = 2;
    pub const STREAM_VERSION: usize = 3;
    pub const EVENT_ID: usize = 4;
    pub const EVENT_TYPE: usize = 5;
    pub const SCHEMA_VERSION: usize = 6;
    pub const PAYLOAD: usize = 7;
    pub const METADATA: usize = 8;
    pub const RECORDED_AT: usize = 9;
}

fn position(row: &SqliteRow) -> Result<Position, StoreError> {
    let key: i64 = row
        .try_get(col::POSITION)
        .map_err(|e| StoreError::Backend(Box::new(e)))?;
    position_of(key)
}

fn text<'r>(
    row: &'r SqliteRow,
    index: usize,
    what: &str,
    at: Position,
) -> Result<&'r str, StoreError> {
    row.try_get(index)
        .map_err(|e| corrupt(at, format!("{what}: {e}")))
}

fn version(row: &SqliteRow, index: usize, at: Position) -> Result<StreamVersion, StoreError> {
    let version: i64 = row.try_get(index).map_err(|e| corrupt(at, e))?;
    u64::try_from(version)
        .map(StreamVersion::new)
        .map_err(|_| corrupt(at, format!("negative stream version {version}")))
}

fn event_id(row: &SqliteRow, index: usize, at: Position) -> Result<EventId, StoreError> {
    let bytes: &[u8] = row.try_get(index).map_err(|e| corrupt(at, e))?;
    uuid::Uuid::from_slice(bytes)
        .map(EventId::from_uuid)
        .map_err(|e| corrupt(at, format!("event_id: {e}")))
}

/// A full event from a read (the columns of `sql::columns!`, in order).
pub(crate) fn recorded(row: &SqliteRow) -> Result<RecordedEvent, StoreError> {
    let at = position(row)?;
    let schema_version: i64 = row
        .try_get(col::SCHEMA_VERSION)
        .map_err(|e| corrupt(at, e))?;
    let micros: i64 = row.try_get(col::RECORDED_AT).map_err(|e| corrupt(at, e))?;
    Ok(RecordedEvent {
        event_id: event_id(row, col::EVENT_ID, at)?,
        stream: StreamId::new(
            text(row, col::STREAM_TYPE, "stream_type", at)?,
            text(row, col::STREAM_ID, "stream_id", at)?,
        ),
        stream_version: version(row, col::STREAM_VERSION, at)?,
        position: at,
        event_type: text(row, col::EVENT_TYPE, "event_type", at)?.to_owned(),
        schema_version: u32::try_from(schema_version)
            .map_err(|_| corrupt(at, format!("schema version {schema_version} out of range")))?,
        recorded_at: DateTime::<Utc>::from_timestamp_micros(micros)
            .ok_or_else(|| corrupt(at, format!("recorded_at {micros} out of range")))?,
        // Handed over as stored, not parsed: whoever reads the event parses them (text that is
        // not JSON, written by something else than this store, is their typed decode error).
        payload: RawJson::from_stored(text(row, col::PAYLOAD, "payload", at)?),
        raw_metadata: RawJson::from_stored(text(row, col::METADATA, "metadata", at)?),
    })
}

/// Where a stored event is, for idempotency checks (the columns of `sql::FIND_IDS`).
pub(crate) fn stored_ref(row: &SqliteRow) -> Result<StoredEventRef, StoreError> {
    let at = position(row)?;
    Ok(StoredEventRef {
        event_id: event_id(row, 1, at)?,
        stream: StreamId::new(
            text(row, 2, "stream_type", at)?,
            text(row, 3, "stream_id", at)?,
        ),
        stream_version: version(row, 4, at)?,
        position: at,
    })
}

/// Now, as stored: microseconds since the Unix epoch.
pub(crate) fn now_micros() -> i64 {
    Utc::now().timestamp_micros()
}
