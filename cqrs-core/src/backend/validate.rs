//! The checks every backend runs before it writes or reads, so that all backends accept and
//! reject exactly the same input, with the same typed errors.

use crate::checkpoint::MAX_CHECKPOINT_NAME_LEN;
use crate::event::{NewEvent, MAX_JSON_DEPTH};
use crate::snapshot::Snapshot;
use crate::store::{EventTypes, StoreError};
use crate::stream::{validate_name, InvalidId, StreamId};

/// Checks a batch before any backend writes it: a valid stream id, at least one event, valid type
/// names, no id twice. Backends call this first so every backend rejects the same input the same way.
pub fn validate_append(stream: &StreamId, events: &[NewEvent]) -> Result<(), StoreError> {
    stream.validate()?;
    if events.is_empty() {
        return Err(StoreError::EmptyAppend {
            stream: stream.clone(),
        });
    }
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    for event in events {
        crate::stream::validate_name(
            "event type",
            &event.event_type,
            crate::stream::MAX_EVENT_TYPE_LEN,
        )?;
        validate_json(&event.payload).map_err(|reason| StoreError::InvalidPayload {
            what: format!("the payload of event {}", event.event_id),
            reason,
        })?;
        let mut custom = event.metadata.custom.iter();
        custom
            .try_for_each(|(key, value)| check_key(key).and_then(|()| validate_json(value)))
            .map_err(|reason| StoreError::InvalidPayload {
                what: format!("the metadata of event {}", event.event_id),
                reason,
            })?;
        if !seen.insert(event.event_id) {
            return Err(StoreError::DuplicateIdInBatch {
                event_id: event.event_id,
            });
        }
    }
    Ok(())
}

/// Checks a JSON value before any backend stores it, so that every backend keeps exactly what
/// it is given and reads it back (and all backends accept and reject the same values):
///
/// - no NUL character (`\u0000`) in strings or keys: PostgreSQL's text and `jsonb` cannot hold
///   it, so a stored payload could not be queried as `jsonb` nor decoded to text in SQL;
/// - at most [`MAX_JSON_DEPTH`] levels of nesting: readers parse stored JSON with `serde_json`,
///   which refuses 128 levels.
///
/// Every finite float reads back exactly: backends store the text as written, and a reader of a
/// backend that normalizes numbers (an exact decimal prints `f64::MAX` as a 309-digit integer)
/// still parses it back exactly with `serde_json`'s `float_roundtrip`, which this crate enables.
pub fn validate_json(value: &serde_json::Value) -> Result<(), String> {
    check_json(value, 1)
}

fn check_json(value: &serde_json::Value, depth: usize) -> Result<(), String> {
    use serde_json::Value;
    match value {
        Value::String(s) => check_text(s, "a string"),
        Value::Number(_) | Value::Null | Value::Bool(_) => Ok(()),
        Value::Array(_) | Value::Object(_) if depth > MAX_JSON_DEPTH => Err(format!(
            "it nests arrays and objects deeper than {MAX_JSON_DEPTH} levels"
        )),
        Value::Array(items) => items.iter().try_for_each(|i| check_json(i, depth + 1)),
        Value::Object(map) => map
            .iter()
            .try_for_each(|(key, item)| check_key(key).and_then(|()| check_json(item, depth + 1))),
    }
}

fn check_key(key: &str) -> Result<(), String> {
    check_text(key, "a key")
}

fn check_text(text: &str, what: &str) -> Result<(), String> {
    if text.contains('\0') {
        return Err(format!(
            "{what} contains a NUL character (\\u0000), which PostgreSQL cannot hold in text or jsonb"
        ));
    }
    Ok(())
}

/// Checks the type names of a read's filter, so a name no backend can store is an
/// [`InvalidId`] on every backend (rather than an empty result on one and a database error on
/// another).
pub fn validate_types(types: EventTypes<'_>) -> Result<(), InvalidId> {
    match types {
        EventTypes::All => Ok(()),
        EventTypes::Only(names) => names.iter().try_for_each(|name| {
            crate::stream::validate_name("event type", name, crate::stream::MAX_EVENT_TYPE_LEN)
        }),
    }
}

/// Checks a checkpoint or consumer name: not empty, at most [`MAX_CHECKPOINT_NAME_LEN`] bytes, no
/// NUL character. Every backend calls it on every path that takes such a name, so all backends
/// reject the same names the same way.
pub fn validate_checkpoint_name(name: &str) -> Result<(), InvalidId> {
    validate_name("checkpoint name", name, MAX_CHECKPOINT_NAME_LEN)
}

/// Checks a snapshot before any backend stores it: a valid stream id and a payload every backend
/// can keep and read back ([`validate_json`]). Backends call it first.
pub fn validate_snapshot(snapshot: &Snapshot) -> Result<(), StoreError> {
    snapshot.stream.validate()?;
    validate_json(&snapshot.payload).map_err(|reason| StoreError::InvalidPayload {
        what: format!("the snapshot of `{}`", snapshot.stream),
        reason,
    })
}
