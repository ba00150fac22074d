//! Identities and coordinates of events: streams, versions, global positions.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Longest stream type accepted by [`StreamId::validate`], in bytes.
pub const MAX_STREAM_TYPE_LEN: usize = 256;
/// Longest stream id accepted by [`StreamId::validate`], in bytes.
///
/// Chosen so that a stream's key fits comfortably in a B-tree index entry of a relational backend.
pub const MAX_STREAM_ID_LEN: usize = 1024;

/// The identity of one event stream: the aggregate (or stream) type plus the instance id.
///
/// `StreamId::new("account", "acc-42")`. Any UTF-8 is allowed except NUL, up to
/// [`MAX_STREAM_TYPE_LEN`] / [`MAX_STREAM_ID_LEN`] bytes; stores call [`StreamId::validate`] before writing.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StreamId {
    stream_type: String,
    id: String,
}

impl StreamId {
    /// A stream id from its type (for aggregates, [`crate::Aggregate::TYPE`]) and instance id.
    pub fn new(stream_type: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            stream_type: stream_type.into(),
            id: id.into(),
        }
    }

    /// The stream type, e.g. `"account"`.
    pub fn stream_type(&self) -> &str {
        &self.stream_type
    }

    /// The instance id within the stream type.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Checks the id can be stored by every backend: non-empty, no NUL byte, within the length limits.
    pub fn validate(&self) -> Result<(), InvalidId> {
        validate_name("stream type", &self.stream_type, MAX_STREAM_TYPE_LEN)?;
        validate_name("stream id", &self.id, MAX_STREAM_ID_LEN)
    }
}

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.stream_type, self.id)
    }
}

/// Longest event type name accepted, in bytes.
pub const MAX_EVENT_TYPE_LEN: usize = 256;

pub(crate) fn validate_name(what: &'static str, value: &str, max: usize) -> Result<(), InvalidId> {
    let reason = if value.is_empty() {
        "must not be empty".to_owned()
    } else if value.len() > max {
        format!("is {} bytes long; the limit is {max}", value.len())
    } else if value.contains('\0') {
        "must not contain a NUL character".to_owned()
    } else {
        return Ok(());
    };
    Err(InvalidId { what, reason })
}

/// An id or name that no backend can store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what}: {reason}")]
pub struct InvalidId {
    /// Which kind of value was rejected ("stream id", "event type", ...).
    pub what: &'static str,
    /// Why it was rejected.
    pub reason: String,
}

/// The version of a stream: the number of events in it. The first event has version 1,
/// and versions are dense (no gaps). [`StreamVersion::INITIAL`] (0) means "no events yet".
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct StreamVersion(u64);

impl StreamVersion {
    /// The version of a stream with no events.
    pub const INITIAL: StreamVersion = StreamVersion(0);

    /// A version from its number.
    pub const fn new(version: u64) -> Self {
        Self(version)
    }

    /// The version number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The version `n` events later.
    pub const fn advance(self, n: u64) -> Self {
        Self(self.0 + n)
    }

    /// The version right after this one.
    pub const fn next(self) -> Self {
        Self(self.0 + 1)
    }
}

impl fmt::Display for StreamVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What the writer believes the stream's version is; checked atomically by [`crate::EventStore::append`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExpectedVersion {
    /// Append whatever the stream's version is.
    Any,
    /// The stream must not exist (have no events).
    NoStream,
    /// The stream must have at least one event.
    StreamExists,
    /// The stream must be at exactly this version ([`StreamVersion::INITIAL`] is the same as `NoStream`).
    Exact(StreamVersion),
}

impl ExpectedVersion {
    /// Whether a stream currently at `actual` satisfies this expectation.
    pub fn is_satisfied_by(self, actual: StreamVersion) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual == StreamVersion::INITIAL,
            ExpectedVersion::StreamExists => actual > StreamVersion::INITIAL,
            ExpectedVersion::Exact(v) => actual == v,
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any version"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("an existing stream"),
            ExpectedVersion::Exact(v) => write!(f, "version {v}"),
        }
    }
}

/// A place in the global log, totally ordered.
///
/// Backends order the log by `(tx, sequence)`: `sequence` is the event's global sequence number
/// (unique, increasing in insertion order) and `tx` identifies the committing transaction, so that a
/// reader never passes an event that is committed later with a lower sequence number (see
/// ARCHITECTURE.md, "gap-free reads"). For the in-memory store `tx` is the append's batch number.
///
/// Positions are the read-your-own-writes token: `to_string()` and [`str::parse`]
/// round-trip (`"<tx>.<sequence>"`), so a position can travel through an HTTP header.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize,
)]
pub struct Position {
    /// The writing transaction (ordering key, compared first).
    pub tx: u64,
    /// The global sequence number of the event.
    pub sequence: u64,
}

impl Position {
    /// Before the first event: reading all events "after" it reads from the beginning.
    pub const START: Position = Position { tx: 0, sequence: 0 };

    /// A position from its parts.
    pub const fn new(tx: u64, sequence: u64) -> Self {
        Self { tx, sequence }
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.tx, self.sequence)
    }
}

/// A string that is not a [`Position`] token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not a position; expected `<tx>.<sequence>`, e.g. `1042.17`")]
pub struct ParsePositionError {
    /// The rejected input (truncated to 64 characters).
    pub input: String,
}

impl FromStr for Position {
    type Err = ParsePositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParsePositionError {
            input: s.chars().take(64).collect(),
        };
        let (tx, seq) = s.trim().split_once('.').ok_or_else(err)?;
        Ok(Position {
            tx: tx.parse().map_err(|_| err())?,
            sequence: seq.parse().map_err(|_| err())?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_version_cases() {
        let zero = StreamVersion::INITIAL;
        let three = StreamVersion::new(3);
        assert!(ExpectedVersion::Any.is_satisfied_by(zero));
        assert!(ExpectedVersion::NoStream.is_satisfied_by(zero));
        assert!(!ExpectedVersion::NoStream.is_satisfied_by(three));
        assert!(ExpectedVersion::StreamExists.is_satisfied_by(three));
        assert!(!ExpectedVersion::StreamExists.is_satisfied_by(zero));
        assert!(ExpectedVersion::Exact(three).is_satisfied_by(three));
        assert!(!ExpectedVersion::Exact(three).is_satisfied_by(zero));
    }

    #[test]
    fn position_token_round_trips_and_rejects_garbage() {
        let p = Position::new(7_000_000_123, 42);
        assert_eq!(p.to_string().parse::<Position>(), Ok(p));
        for bad in ["", "12", "a.b", "1.2.3", "-1.2", "1."] {
            assert!(bad.parse::<Position>().is_err(), "{bad} parsed");
        }
        assert!(Position::new(1, 9) < Position::new(2, 3), "tx orders first");
    }

    #[test]
    fn stream_id_validation() {
        assert!(StreamId::new("account", "a'; DROP TABLE x;--ü")
            .validate()
            .is_ok());
        assert!(StreamId::new("", "x").validate().is_err());
        assert!(StreamId::new("a", "").validate().is_err());
        assert!(StreamId::new("a", "x\0y").validate().is_err());
        let long = "x".repeat(MAX_STREAM_ID_LEN + 1);
        let err = StreamId::new("a", long).validate().unwrap_err();
        assert!(err.to_string().contains("limit is 1024"), "{err}");
    }
}
