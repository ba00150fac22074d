//! Rows back into core types. Nothing here panics on what the database returns: an unreadable row
//! becomes [`StoreError::CorruptEvent`] naming its position.

use chrono::{DateTime, Utc};
use cqrs_core::backend::StoredEventRef;
use cqrs_core::{
    EventId, Position, RawJson, RecordedEvent, ReplayEvent, StoreError, StreamId, StreamVersion,
};
use sqlx::postgres::PgRow;
use sqlx::{ColumnIndex, Row};

use crate::error::map_error;

fn corrupt(position: Position, reason: impl std::fmt::Display) -> StoreError {
    StoreError::CorruptEvent {
        position,
        reason: reason.to_string(),
    }
}

/// A transaction id as PostgreSQL prints an `xid8`.
pub(crate) fn parse_tx(text: &str) -> Result<u64, String> {
    text.parse()
        .map_err(|e| format!("bad transaction id `{text}`: {e}"))
}

/// The index of each column of [`crate::sql`]'s `COLUMNS`, in its order (reads decode by index:
/// a name lookup per column and row is measurable when catching up). Every statement whose rows
/// carry a position selects `position, tx::text` first, so [`position`] reads columns 0 and 1.
mod col {
    pub const POSITION: usize = 0;
    pub const TX: usize = 1;
    pub const STREAM_TYPE: usize = 2;
    pub const STREAM_ID: usize = 3;
    pub const STREAM_VERSION: usize = 4;
    pub const EVENT_ID: usize = 5;
    pub const EVENT_TYPE: usize = 6;
    pub const SCHEMA_VERSION: usize = 7;
    pub const PAYLOAD: usize = 8;
    pub const METADATA: usize = 9;
    pub const RECORDED_AT: usize = 10;
}

/// The position, from the first two columns (`position, tx::text`). Without them there is no
/// position to name, so a failure here is a backend error rather than a corrupt event.
pub(crate) fn position(row: &PgRow) -> Result<Position, StoreError> {
    let sequence: i64 = row.try_get(col::POSITION).map_err(map_error)?;
    let sequence = u64::try_from(sequence)
        .map_err(|_| StoreError::Backend(format!("negative position {sequence}").into()))?;
    let tx: &str = row.try_get(col::TX).map_err(map_error)?;
    let tx = parse_tx(tx).map_err(|reason| corrupt(Position::new(0, sequence), reason))?;
    Ok(Position::new(tx, sequence))
}

fn version(
    row: &PgRow,
    index: impl ColumnIndex<PgRow>,
    at: Position,
) -> Result<StreamVersion, StoreError> {
    let version: i64 = row.try_get(index).map_err(|e| corrupt(at, e))?;
    u64::try_from(version)
        .map(StreamVersion::new)
        .map_err(|_| corrupt(at, format!("negative stream version {version}")))
}

/// A text column; `what` names it in the error.
fn text<'r>(
    row: &'r PgRow,
    index: impl ColumnIndex<PgRow>,
    what: &str,
    at: Position,
) -> Result<&'r str, StoreError> {
    row.try_get(index)
        .map_err(|e| corrupt(at, format!("{what}: {e}")))
}

fn schema_version(row: &PgRow, index: usize, at: Position) -> Result<u32, StoreError> {
    let schema_version: i32 = row.try_get(index).map_err(|e| corrupt(at, e))?;
    u32::try_from(schema_version)
        .map_err(|_| corrupt(at, format!("negative schema version {schema_version}")))
}

fn recorded_at(row: &PgRow, index: usize, at: Position) -> Result<DateTime<Utc>, StoreError> {
    row.try_get(index).map_err(|e| corrupt(at, e))
}

fn event_id(
    row: &PgRow,
    index: impl ColumnIndex<PgRow>,
    at: Position,
) -> Result<EventId, StoreError> {
    row.try_get(index)
        .map(EventId::from_uuid)
        .map_err(|e| corrupt(at, e))
}

/// A full event from a [`crate::sql`] read (the columns of `COLUMNS`, in order). The payload and
/// metadata are handed over as the stored `json` text (validated when written), not
/// parsed: whoever reads the event parses them, into the type they need.
pub(crate) fn recorded(row: &PgRow) -> Result<RecordedEvent, StoreError> {
    let at = position(row)?;
    Ok(RecordedEvent {
        event_id: event_id(row, col::EVENT_ID, at)?,
        stream: StreamId::new(
            text(row, col::STREAM_TYPE, "stream_type", at)?,
            text(row, col::STREAM_ID, "stream_id", at)?,
        ),
        stream_version: version(row, col::STREAM_VERSION, at)?,
        position: at,
        event_type: text(row, col::EVENT_TYPE, "event_type", at)?.to_owned(),
        schema_version: schema_version(row, col::SCHEMA_VERSION, at)?,
        recorded_at: recorded_at(row, col::RECORDED_AT, at)?,
        payload: RawJson::from_stored(text(row, col::PAYLOAD, "payload", at)?),
        raw_metadata: RawJson::from_stored(text(row, col::METADATA, "metadata", at)?),
    })
}

/// The columns of `REPLAY_COLUMNS`, in order.
pub(crate) mod replay_col {
    pub const STREAM_VERSION: usize = 0;
    pub const EVENT_TYPE: usize = 1;
    pub const SCHEMA_VERSION: usize = 2;
    pub const PAYLOAD: usize = 3;
    pub const RECORDED_AT: usize = 4;
    /// A grouped load's member (`read_streams_for_replay`), after the replay columns.
    pub const MEMBER: usize = 5;
}

/// An event as replay reads it (the columns of `REPLAY_COLUMNS`, in order), or `None` if the row
/// is unreadable: a replay row has no position to name, so the caller reads the full row again
/// for the error.
pub(crate) fn replayed(row: &PgRow) -> Option<ReplayEvent> {
    let version: i64 = row.try_get(replay_col::STREAM_VERSION).ok()?;
    let schema_version: i32 = row.try_get(replay_col::SCHEMA_VERSION).ok()?;
    Some(ReplayEvent::new(
        StreamVersion::new(u64::try_from(version).ok()?),
        row.try_get::<&str, _>(replay_col::EVENT_TYPE)
            .ok()?
            .to_owned(),
        u32::try_from(schema_version).ok()?,
        row.try_get(replay_col::RECORDED_AT).ok()?,
        RawJson::from_stored(row.try_get::<&str, _>(replay_col::PAYLOAD).ok()?),
    ))
}

/// Where a stored event is, for idempotency checks (the columns of `find_ids`).
pub(crate) fn stored_ref(row: &PgRow) -> Result<StoredEventRef, StoreError> {
    let at = position(row)?;
    Ok(StoredEventRef {
        event_id: event_id(row, "event_id", at)?,
        stream: StreamId::new(
            text(row, "stream_type", "stream_type", at)?,
            text(row, "stream_id", "stream_id", at)?,
        ),
        stream_version: version(row, "stream_version", at)?,
        position: at,
    })
}
