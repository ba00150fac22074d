//! Events: the [`Event`] trait for one event type, [`EventSet`] for an aggregate's set of events,
//! and the envelopes they travel in ([`NewEvent`] before append, [`RecordedEvent`] after).

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::json::RawJson;
use crate::stream::{Position, StreamId, StreamVersion};
use crate::upcast::DecodeError;

/// The unique id of an event; time-ordered (UUID v7) by default. Appending an event whose id is already
/// stored is an idempotent retry (see [`crate::EventStore::append`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct EventId(Uuid);

/// The UUID v5 namespace of [`EventId::derived`]. Fixed forever: stored ids depend on it.
const DERIVED_EVENT_IDS: Uuid = Uuid::from_u128(0x5c0e_7d1e_9b2a_4f3c_8e61_0c2d_a7f4_1b93);

impl EventId {
    /// A fresh time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id of event number `index` (from 0) of the command `command_id`: the same inputs give
    /// the same id, so executing an idempotent command again re-sends the same ids and the
    /// store's idempotent append recognises them (see [`crate::CommandContext::with_command_id`]).
    pub fn derived(command_id: Uuid, index: u32) -> Self {
        let mut name = [0u8; 20];
        name[..16].copy_from_slice(command_id.as_bytes());
        name[16..].copy_from_slice(&index.to_be_bytes());
        Self(Uuid::new_v5(&DERIVED_EVENT_IDS, &name))
    }

    /// Wraps an existing UUID.
    pub const fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    /// The UUID.
    pub const fn as_uuid(&self) -> &Uuid {
        &self.0
    }
}

impl Default for EventId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// One event type: a plain struct with a stable stored name and a schema version.
///
/// Implemented by `#[event]`, which also generates [`Event::decode`] for older schema versions
/// (the upcast chain). A hand-written impl only needs the two constants: the default `decode`
/// accepts the current version and rejects every other one with a typed error.
///
/// ```
/// use cqrs_core::{Event, RawJson};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Serialize, Deserialize)]
/// struct Deposited { amount: i64 }
///
/// impl Event for Deposited {
///     const NAME: &'static str = "Deposited";
///     const VERSION: u32 = 1;
/// }
///
/// let json = RawJson::from_stored(r#"{"amount":5}"#);
/// assert_eq!(Deposited::decode(1, &json).unwrap().amount, 5);
/// assert!(Deposited::decode(2, &json).is_err());
/// ```
#[diagnostic::on_unimplemented(
    message = "`{Self}` is used as an event but is not an `#[event]`",
    label = "not an `#[event]`",
    note = "add `#[event]` to `{Self}`, above its `#[derive(Serialize, Deserialize)]`"
)]
pub trait Event: Serialize + serde::de::DeserializeOwned + Send + Sync + 'static {
    /// The name stored with every event of this type. Never derived from module paths: moving the type
    /// must not rename stored data.
    const NAME: &'static str;
    /// The current schema version (1-based).
    const VERSION: u32;

    /// Decodes a payload stored with `schema_version`, upcasting older versions to this type.
    /// The stored version's type is deserialized straight from the text; only a JSON upcaster
    /// (`#[event(upcast_json = f)]`) works on a parsed [`Value`].
    fn decode(schema_version: u32, payload: &RawJson) -> Result<Self, DecodeError> {
        if schema_version == Self::VERSION {
            crate::upcast::deserialize(Self::NAME, schema_version, payload)
        } else {
            Err(DecodeError::UnsupportedVersion {
                event_type: Self::NAME.to_owned(),
                version: schema_version,
                current: Self::VERSION,
            })
        }
    }

    /// Encodes this event as its stored JSON payload.
    fn encode(&self) -> Result<Value, EncodeError> {
        serde_json::to_value(self).map_err(|source| EncodeError {
            event_type: Self::NAME,
            source,
        })
    }
}

/// The closed set of events one aggregate (or stream) produces; usually the enum that
/// `#[derive(Aggregate)]` generates, with one variant per [`Event`] type.
pub trait EventSet: Sized + Send + Sync + 'static {
    /// The stored names of every event in the set.
    const NAMES: &'static [&'static str];

    /// The stored name of this event.
    fn event_type(&self) -> &'static str;
    /// The schema version this event is written with.
    fn schema_version(&self) -> u32;
    /// Encodes the event's payload.
    fn encode(&self) -> Result<Value, EncodeError>;
    /// Decodes a stored event by its type name and schema version.
    fn decode(
        event_type: &str,
        schema_version: u32,
        payload: &RawJson,
    ) -> Result<Self, DecodeError>;
}

/// An event could not be serialized (e.g. a map with non-string keys).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode event `{event_type}`")]
pub struct EncodeError {
    /// The event type that failed.
    pub event_type: &'static str,
    /// The serializer's error.
    #[source]
    pub source: serde_json::Error,
}

/// Context stored with every event: why it happened and in which conversation.
///
/// `causation_id` is the id of the command (or event) that caused it; `correlation_id` is shared by
/// everything that follows from one original request. `custom` holds user key/values (user id,
/// tenant, ...).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    /// The conversation this event belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<Uuid>,
    /// The command or event that directly caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// User-defined key/values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub custom: BTreeMap<String, Value>,
}

impl Metadata {
    /// The metadata as JSON text, the same JSON its `Serialize` impl writes (keys may come in
    /// another order), without the serializer's error path: the fields are UUIDs and JSON values, which always print. For a
    /// backend building a [`RecordedEvent`] from metadata it holds typed.
    pub fn to_json(&self) -> RawJson {
        let mut fields = serde_json::Map::new();
        if let Some(id) = self.correlation_id {
            fields.insert("correlation_id".to_owned(), Value::String(id.to_string()));
        }
        if let Some(id) = self.causation_id {
            fields.insert("causation_id".to_owned(), Value::String(id.to_string()));
        }
        if !self.custom.is_empty() {
            let custom = self.custom.iter().map(|(k, v)| (k.clone(), v.clone()));
            fields.insert("custom".to_owned(), Value::Object(custom.collect()));
        }
        RawJson::from(Value::Object(fields))
    }
}

/// Deepest nesting of arrays and objects accepted in a payload or a metadata value.
pub const MAX_JSON_DEPTH: usize = 100;

/// An encoded event ready to append: what a command produced.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Unique id; re-appending the same id is an idempotent retry.
    pub event_id: EventId,
    /// The stored event type name.
    pub event_type: String,
    /// The schema version of `payload`.
    pub schema_version: u32,
    /// The event's JSON payload.
    pub payload: Value,
    /// Correlation, causation and custom metadata.
    pub metadata: Metadata,
}

impl NewEvent {
    /// Encodes a typed event with a fresh id and empty metadata.
    pub fn from_event<E: Event>(event: &E) -> Result<Self, EncodeError> {
        Ok(Self {
            event_id: EventId::new(),
            event_type: E::NAME.to_owned(),
            schema_version: E::VERSION,
            payload: event.encode()?,
            metadata: Metadata::default(),
        })
    }

    /// Encodes one event of an [`EventSet`] with a fresh id and empty metadata.
    pub fn from_set<S: EventSet>(event: &S) -> Result<Self, EncodeError> {
        Ok(Self {
            event_id: EventId::new(),
            event_type: event.event_type().to_owned(),
            schema_version: event.schema_version(),
            payload: event.encode()?,
            metadata: Metadata::default(),
        })
    }

    /// Replaces the metadata.
    pub fn with_metadata(mut self, metadata: Metadata) -> Self {
        self.metadata = metadata;
        self
    }
}

/// A stored event as an aggregate's replay reads it: what decoding, upcasting and loading "as of"
/// a version or an instant need, without the metadata, the stream id (the caller knows it) and
/// the global position (an error that must name it looks it up).
/// [`EventStore::read_stream_for_replay`](crate::EventStore::read_stream_for_replay) returns
/// these; a backend reads fewer columns for them than for a [`RecordedEvent`].
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ReplayEvent {
    /// Its version within the stream (1-based, dense).
    pub stream_version: StreamVersion,
    /// The stored event type name.
    pub event_type: String,
    /// The schema version the payload was written with.
    pub schema_version: u32,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
    /// The JSON payload as stored.
    pub payload: RawJson,
}

impl ReplayEvent {
    /// A replay event from its parts (for backends that read it from their own rows).
    pub fn new(
        stream_version: StreamVersion,
        event_type: String,
        schema_version: u32,
        recorded_at: DateTime<Utc>,
        payload: RawJson,
    ) -> Self {
        Self {
            stream_version,
            event_type,
            schema_version,
            recorded_at,
            payload,
        }
    }

    /// Decodes the payload as one event of the set `S`, upcasting older schema versions.
    pub fn decode_set<S: EventSet>(&self) -> Result<S, DecodeError> {
        S::decode(&self.event_type, self.schema_version, &self.payload)
    }
}

impl From<RecordedEvent> for ReplayEvent {
    fn from(event: RecordedEvent) -> Self {
        Self {
            stream_version: event.stream_version,
            event_type: event.event_type,
            schema_version: event.schema_version,
            recorded_at: event.recorded_at,
            payload: event.payload,
        }
    }
}

/// A stored event with its full envelope.
///
/// The payload and the metadata are the JSON text the store returned ([`RawJson`]), parsed only
/// when asked for: [`decode`](Self::decode) and [`decode_set`](Self::decode_set) deserialize the
/// payload straight into the typed event, [`metadata`](Self::metadata) parses the metadata. A
/// reader that needs neither (a projection skipping an event, a relay forwarding the text) never
/// parses them. Malformed stored JSON is a [`DecodeError`] from those calls, never a panic.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    /// Unique event id.
    pub event_id: EventId,
    /// The stream it belongs to.
    pub stream: StreamId,
    /// Its version within the stream (1-based, dense).
    pub stream_version: StreamVersion,
    /// Its place in the global log.
    pub position: Position,
    /// The stored event type name.
    pub event_type: String,
    /// The schema version the payload was written with.
    pub schema_version: u32,
    /// When the store recorded it.
    pub recorded_at: DateTime<Utc>,
    /// The JSON payload as stored (upcasting happens on decode, never in storage).
    pub payload: RawJson,
    /// The stored [`Metadata`] as JSON text; [`RecordedEvent::metadata`] parses it.
    pub raw_metadata: RawJson,
}

impl RecordedEvent {
    /// Decodes the payload as event type `E`, upcasting older schema versions.
    ///
    /// Fails with [`DecodeError::UnexpectedType`] if the stored type name is not `E::NAME`.
    pub fn decode<E: Event>(&self) -> Result<E, DecodeError> {
        if self.event_type != E::NAME {
            return Err(DecodeError::UnexpectedType {
                expected: E::NAME,
                found: self.event_type.clone(),
            });
        }
        E::decode(self.schema_version, &self.payload)
    }

    /// Decodes the payload as one event of the set `S`.
    pub fn decode_set<S: EventSet>(&self) -> Result<S, DecodeError> {
        S::decode(&self.event_type, self.schema_version, &self.payload)
    }

    /// Parses the correlation, causation and custom metadata.
    ///
    /// Fails with [`DecodeError::Metadata`] if the stored text is not metadata.
    pub fn metadata(&self) -> Result<Metadata, DecodeError> {
        self.raw_metadata
            .decode()
            .map_err(|source| DecodeError::Metadata {
                event_type: self.event_type.clone(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn metadata_to_json_is_the_json_serialize_writes() {
        let mut full = Metadata {
            correlation_id: Some(Uuid::now_v7()),
            causation_id: Some(Uuid::now_v7()),
            custom: BTreeMap::new(),
        };
        full.custom.insert(
            "user".to_owned(),
            serde_json::json!({ "id": 7, "tags": ["a"] }),
        );
        let only_causation = Metadata {
            causation_id: Some(Uuid::now_v7()),
            ..Metadata::default()
        };
        for metadata in [Metadata::default(), full, only_causation] {
            let json = metadata.to_json();
            assert_eq!(
                json.to_value().unwrap(),
                serde_json::to_value(&metadata).unwrap()
            );
            assert_eq!(json.decode::<Metadata>().unwrap(), metadata);
        }
    }
}
