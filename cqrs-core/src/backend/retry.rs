//! The idempotent-retry decision: a batch whose event ids are already stored is a retry (the
//! original result) or a conflict, decided the same way by every backend.

use crate::event::{EventId, NewEvent};
use crate::store::{AppendResult, StoreError};
use crate::stream::{Position, StreamId, StreamVersion};

/// Where an already-stored event is; input to [`resolve_retry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEventRef {
    /// The stored event's id.
    pub event_id: EventId,
    /// Its stream.
    pub stream: StreamId,
    /// Its stream version.
    pub stream_version: StreamVersion,
    /// Its global position.
    pub position: Position,
}

/// Decides an append whose event ids were (partly) found in the store: returns the original result if
/// `stored` is exactly `batch` on `stream` (same ids, consecutive versions, same order), otherwise
/// [`StoreError::IdempotencyConflict`]. `stored` may be in any order.
pub fn resolve_retry(
    stream: &StreamId,
    batch: &[NewEvent],
    stored: &[StoredEventRef],
) -> Result<AppendResult, StoreError> {
    let conflict =
        |event_id: EventId, detail: String| StoreError::IdempotencyConflict { event_id, detail };
    let find = |id: &EventId| stored.iter().find(|s| s.event_id == *id);
    let first = batch.first().ok_or_else(|| StoreError::EmptyAppend {
        stream: stream.clone(),
    })?;
    let Some(head) = find(&first.event_id) else {
        let present = stored.first().map_or(first.event_id, |s| s.event_id);
        return Err(conflict(
            present,
            "only part of the batch is stored".to_owned(),
        ));
    };
    let mut last = head;
    for (offset, event) in (0u64..).zip(batch) {
        let Some(found) = find(&event.event_id) else {
            return Err(conflict(
                head.event_id,
                "only part of the batch is stored".to_owned(),
            ));
        };
        if found.stream != *stream {
            return Err(conflict(
                found.event_id,
                format!("it belongs to stream `{}`", found.stream),
            ));
        }
        if found.stream_version != head.stream_version.advance(offset) {
            return Err(conflict(
                found.event_id,
                "the stored events are not this batch in this order".to_owned(),
            ));
        }
        last = found;
    }
    Ok(AppendResult {
        stream_version: last.stream_version,
        position: last.position,
    })
}
