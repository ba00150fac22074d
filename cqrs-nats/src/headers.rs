//! The integration message's envelope: NATS headers carrying the event's identity and origin,
//! written by the relay and read back by the consumer.

use async_nats::HeaderMap;
use cqrs_core::{
    DecodeError, EventId, Metadata, Position, RawJson, RecordedEvent, StreamId, StreamVersion,
};
use serde_json::Value;
use uuid::Uuid;

/// JetStream's de-duplication key: the event id.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// The event id (also in [`MSG_ID`], which JetStream may strip or reuse).
pub const EVENT_ID: &str = "Cqrs-Event-Id";
/// The public message type (the integration event's name, not necessarily the stored one).
pub const EVENT_TYPE: &str = "Cqrs-Event-Type";
/// The public message's schema version.
pub const SCHEMA_VERSION: &str = "Cqrs-Schema-Version";
/// The origin stream's type, percent-encoded.
pub const STREAM_TYPE: &str = "Cqrs-Stream-Type";
/// The origin stream's id, percent-encoded.
pub const STREAM_ID: &str = "Cqrs-Stream-Id";
/// The event's version in its stream.
pub const STREAM_VERSION: &str = "Cqrs-Stream-Version";
/// The event's position in the origin's log (`tx.sequence`).
pub const POSITION: &str = "Cqrs-Position";
/// When the origin recorded the event (RFC 3339).
pub const RECORDED_AT: &str = "Cqrs-Recorded-At";
/// The correlation id, if any.
pub const CORRELATION_ID: &str = "Cqrs-Correlation-Id";
/// The causation id, if any.
pub const CAUSATION_ID: &str = "Cqrs-Causation-Id";

/// The key under which a consumed event's metadata carries its position in the origin's log
/// (its own `position` is the JetStream stream sequence, the consumer's checkpoint).
pub const ORIGIN_POSITION: &str = "origin_position";

/// Header values are one line of visible ASCII; stream ids are any UTF-8 without NUL. Every byte
/// outside `[A-Za-z0-9_-]` becomes `%XX`, so the value is safe both as a header and as one
/// subject token (no `.`, `*`, `>` or whitespace), and decodes back exactly.
pub fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// Inverse of [`encode`]; `None` for malformed input.
pub fn decode(value: &str) -> Option<String> {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = value.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The headers of the message for `event`, published as `message_type` at `schema_version`.
/// Fails if the event's stored metadata (its correlation and causation ids) cannot be read.
pub fn for_event(
    event: &RecordedEvent,
    message_type: &str,
    schema_version: u32,
) -> Result<HeaderMap, DecodeError> {
    let metadata = event.metadata()?;
    let mut headers = HeaderMap::new();
    let id = event.event_id.to_string();
    headers.insert(MSG_ID, id.as_str());
    headers.insert(EVENT_ID, id.as_str());
    headers.insert(EVENT_TYPE, encode(message_type).as_str());
    headers.insert(SCHEMA_VERSION, schema_version.to_string().as_str());
    headers.insert(STREAM_TYPE, encode(event.stream.stream_type()).as_str());
    headers.insert(STREAM_ID, encode(event.stream.id()).as_str());
    headers.insert(
        STREAM_VERSION,
        event.stream_version.get().to_string().as_str(),
    );
    headers.insert(POSITION, event.position.to_string().as_str());
    headers.insert(RECORDED_AT, event.recorded_at.to_rfc3339().as_str());
    if let Some(id) = metadata.correlation_id {
        headers.insert(CORRELATION_ID, id.to_string().as_str());
    }
    if let Some(id) = metadata.causation_id {
        headers.insert(CAUSATION_ID, id.to_string().as_str());
    }
    Ok(headers)
}

/// Why a message cannot be read as an integration event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MessageError {
    /// A required header is missing.
    #[error("header `{0}` is missing")]
    MissingHeader(&'static str),
    /// A header's value is malformed.
    #[error("header `{header}` is malformed: {value:?}")]
    BadHeader {
        /// The header.
        header: &'static str,
        /// Its value.
        value: String,
    },
    /// The payload is not JSON.
    #[error("the payload is not JSON: {0}")]
    Payload(String),
}

fn header<'a>(headers: &'a HeaderMap, name: &'static str) -> Result<&'a str, MessageError> {
    headers
        .get(name)
        .map(|v| v.as_str())
        .ok_or(MessageError::MissingHeader(name))
}

fn parsed<T: std::str::FromStr>(
    headers: &HeaderMap,
    name: &'static str,
) -> Result<T, MessageError> {
    let value = header(headers, name)?;
    value.parse().map_err(|_| MessageError::BadHeader {
        header: name,
        value: value.to_owned(),
    })
}

fn text(headers: &HeaderMap, name: &'static str) -> Result<String, MessageError> {
    let value = header(headers, name)?;
    decode(value).ok_or_else(|| MessageError::BadHeader {
        header: name,
        value: value.to_owned(),
    })
}

fn optional_uuid(headers: &HeaderMap, name: &'static str) -> Result<Option<Uuid>, MessageError> {
    match headers.get(name) {
        None => Ok(None),
        Some(_) => parsed(headers, name).map(Some),
    }
}

/// The event id in `headers`, if it is there and well-formed: also for a message that cannot be
/// read as a whole (its skip is then recorded with the id).
pub(crate) fn event_id(headers: Option<&HeaderMap>) -> Option<EventId> {
    let id: Uuid = parsed(headers?, EVENT_ID).ok()?;
    Some(EventId::from_uuid(id))
}

/// The event a consumer hands its projection: the public message type and payload, the origin's
/// stream, version and ids, and `position` = the JetStream stream `sequence` (the consumer's
/// checkpoint; the origin's position is in `metadata.custom[ORIGIN_POSITION]`).
pub(crate) fn to_event(
    headers: Option<&HeaderMap>,
    payload: &[u8],
    sequence: u64,
) -> Result<RecordedEvent, MessageError> {
    let headers = headers.ok_or(MessageError::MissingHeader(EVENT_ID))?;
    let event_id: Uuid = parsed(headers, EVENT_ID)?;
    let origin: Position = parsed(headers, POSITION)?;
    let recorded_at = chrono::DateTime::parse_from_rfc3339(header(headers, RECORDED_AT)?)
        .map_err(|_| MessageError::BadHeader {
            header: RECORDED_AT,
            value: header(headers, RECORDED_AT).unwrap_or_default().to_owned(),
        })?
        .with_timezone(&chrono::Utc);
    // A message comes from outside the store, unchecked: it must be JSON before a projection
    // sees it (an undecodable message is skipped and recorded, not handed on). Checked without
    // building a `Value`; the projection parses the text into the type it needs.
    let payload = std::str::from_utf8(payload).map_err(|e| MessageError::Payload(e.to_string()))?;
    serde_json::from_str::<serde::de::IgnoredAny>(payload)
        .map_err(|e| MessageError::Payload(e.to_string()))?;
    let mut metadata = Metadata {
        correlation_id: optional_uuid(headers, CORRELATION_ID)?,
        causation_id: optional_uuid(headers, CAUSATION_ID)?,
        ..Metadata::default()
    };
    metadata.custom.insert(
        ORIGIN_POSITION.to_owned(),
        Value::String(origin.to_string()),
    );
    Ok(RecordedEvent {
        event_id: EventId::from_uuid(event_id),
        stream: StreamId::new(text(headers, STREAM_TYPE)?, text(headers, STREAM_ID)?),
        stream_version: StreamVersion::new(parsed(headers, STREAM_VERSION)?),
        position: Position::new(0, sequence),
        event_type: text(headers, EVENT_TYPE)?,
        schema_version: parsed(headers, SCHEMA_VERSION)?,
        recorded_at,
        payload: RawJson::from_stored(payload),
        raw_metadata: metadata.to_json(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_and_is_one_subject_token() {
        for value in ["account", "a.b*c>d e", "ünï\r\n%41", ""] {
            let encoded = encode(value);
            assert!(encoded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-%".contains(&b)));
            assert_eq!(decode(&encoded).as_deref(), Some(value));
        }
        assert_eq!(decode("%4"), None);
        assert_eq!(decode("%zz"), None);
    }
}
