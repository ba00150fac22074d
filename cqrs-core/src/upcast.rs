//! Decoding stored payloads, including older schema versions (upcasting).
//!
//! Stored events keep the schema version they were written with; they are upcast on read only.
//! `#[event(version = 3, upcast_from = V2)]` generates an [`crate::Event::decode`] that walks
//! `V1 -> V2 -> V3` through `From` impls; `upcast_json = path::to::fn` lets a function rewrite an
//! older payload's JSON into the current shape instead (renamed fields, split values).

use serde_json::Value;

use crate::json::RawJson;

/// A stored event that could not be turned into its Rust type.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The stored type name belongs to no event the reader knows.
    #[error("unknown event type `{event_type}`")]
    UnknownEventType {
        /// The stored type name.
        event_type: String,
    },
    /// The stored schema version has no decode path: newer than the code, or older than any upcaster.
    #[error(
        "event `{event_type}` has schema version {version}, which this code cannot decode (current version is {current})"
    )]
    UnsupportedVersion {
        /// The stored type name.
        event_type: String,
        /// The stored schema version.
        version: u32,
        /// The version the code decodes to.
        current: u32,
    },
    /// The caller asked for one event type and the stored event is another.
    #[error("expected event `{expected}`, found `{found}`")]
    UnexpectedType {
        /// The requested type name.
        expected: &'static str,
        /// The stored type name.
        found: String,
    },
    /// The payload does not match the schema of its version.
    #[error("malformed payload for event `{event_type}` version {version}")]
    Payload {
        /// The stored type name.
        event_type: String,
        /// The stored schema version.
        version: u32,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// The stored metadata is not valid [`crate::Metadata`] JSON.
    #[error("malformed metadata for event `{event_type}`")]
    Metadata {
        /// The stored type name.
        event_type: String,
        /// The deserializer's error.
        #[source]
        source: serde_json::Error,
    },
    /// A user-supplied upcaster rejected the payload.
    #[error("upcasting event `{event_type}` from version {from_version} failed")]
    Upcast {
        /// The stored type name.
        event_type: String,
        /// The stored schema version.
        from_version: u32,
        /// The upcaster's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Deserializes `payload`'s text straight into `T`, mapping a failure to [`DecodeError::Payload`].
pub fn deserialize<T: serde::de::DeserializeOwned>(
    event_type: &str,
    version: u32,
    payload: &RawJson,
) -> Result<T, DecodeError> {
    payload.decode().map_err(|source| DecodeError::Payload {
        event_type: event_type.to_owned(),
        version,
        source,
    })
}

/// Deserializes a [`Value`] (what a JSON upcaster returned) as `T`, mapping a failure to
/// [`DecodeError::Payload`].
pub(crate) fn deserialize_value<T: serde::de::DeserializeOwned>(
    event_type: &str,
    version: u32,
    payload: &Value,
) -> Result<T, DecodeError> {
    T::deserialize(payload).map_err(|source| DecodeError::Payload {
        event_type: event_type.to_owned(),
        version,
        source,
    })
}

/// What a JSON upcaster (`#[event(upcast_json = f)]`) returns: the payload rewritten to the
/// current version's shape, or an error explaining why this payload cannot be upcast.
pub type JsonUpcastResult = Result<Value, Box<dyn std::error::Error + Send + Sync>>;
