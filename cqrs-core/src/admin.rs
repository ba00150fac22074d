//! What an operator's tools need from a store beyond the storage traits: which streams exist,
//! which checkpoints are kept, who holds a projection's lease, and what holds readers back.
//!
//! [`StoreAdmin`] is implemented by the backends with a few SQL statements each; the `cqrs-admin`
//! command line is written against it, so it works on every backend that implements it. The
//! conformance suite checks every implementation the same way (`admin_conformance_tests!`,
//! feature `conformance`).
//!
//! Everything here reads; nothing changes the log. Listing stream types scans the whole log: it
//! is meant for an operator at a terminal, not for a request path.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::store::{EventStore, StoreError};
use crate::stream::{validate_name, InvalidId, Position, StreamVersion, MAX_STREAM_ID_LEN};
use crate::stream::{StreamId, MAX_STREAM_TYPE_LEN};
use crate::subscription::{RecordedFailure, SkippedEvent};

/// One stream type of the log, with how much it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StreamTypeSummary {
    /// The stream type, e.g. `"account"`.
    pub stream_type: String,
    /// How many streams of this type hold at least one event.
    pub streams: u64,
    /// How many events the streams of this type hold.
    pub events: u64,
}

impl StreamTypeSummary {
    /// A summary (for backends).
    pub fn new(stream_type: String, streams: u64, events: u64) -> Self {
        Self {
            stream_type,
            streams,
            events,
        }
    }
}

/// One stream, as [`StoreAdmin::list_streams`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct StreamSummary {
    /// The stream.
    pub stream: StreamId,
    /// Its current version: how many events it holds.
    pub version: StreamVersion,
    /// When its last event was recorded.
    pub last_recorded_at: DateTime<Utc>,
}

impl StreamSummary {
    /// A summary (for backends).
    pub fn new(stream: StreamId, version: StreamVersion, last_recorded_at: DateTime<Utc>) -> Self {
        Self {
            stream,
            version,
            last_recorded_at,
        }
    }
}

/// A kept checkpoint: a projection (or consumer) and how far it has applied the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct CheckpointInfo {
    /// The checkpoint's name (a projection's name).
    pub name: String,
    /// The last position applied.
    pub position: Position,
    /// When it last moved, where the backend records it.
    pub updated_at: Option<DateTime<Utc>>,
}

impl CheckpointInfo {
    /// A checkpoint (for backends).
    pub fn new(name: String, position: Position, updated_at: Option<DateTime<Utc>>) -> Self {
        Self {
            name,
            position,
            updated_at,
        }
    }
}

/// Who holds a projection's lease: the active runner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LeaseHolder {
    /// The holder's process id, where the backend can see it (a PostgreSQL backend process id
    /// for an advisory lock; `None` for an operating-system file lock).
    pub pid: Option<i64>,
    /// What the backend knows about the holder, for people (application name, client address).
    pub description: String,
    /// Since when the holder's session exists, where known.
    pub since: Option<DateTime<Utc>>,
}

impl LeaseHolder {
    /// A holder (for backends).
    pub fn new(pid: Option<i64>, description: String, since: Option<DateTime<Utc>>) -> Self {
        Self {
            pid,
            description,
            since,
        }
    }
}

/// What holds readers of the log back: events committed but not yet readable by gap-free reads,
/// and the transaction they wait for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HorizonReport {
    /// Committed events that [`EventStore::read_all`] does not return yet.
    pub waiting_events: u64,
    /// The transaction readers wait for, if any holds them back and the backend can see it.
    pub held_by: Option<HorizonHolderInfo>,
    /// The backend's one-line account, for people.
    pub description: String,
}

impl HorizonReport {
    /// A report (for backends).
    pub fn new(
        waiting_events: u64,
        held_by: Option<HorizonHolderInfo>,
        description: String,
    ) -> Self {
        Self {
            waiting_events,
            held_by,
            description,
        }
    }
}

/// The transaction at the visibility horizon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct HorizonHolderInfo {
    /// The transaction's id, as the backend names it.
    pub transaction: String,
    /// The process running it, where visible (for `pg_terminate_backend`).
    pub pid: Option<i64>,
    /// Since when it runs, where visible.
    pub since: Option<DateTime<Utc>>,
    /// What else the backend knows (database, application, state), for people.
    pub description: String,
}

impl HorizonHolderInfo {
    /// A holder (for backends).
    pub fn new(
        transaction: String,
        pid: Option<i64>,
        since: Option<DateTime<Utc>>,
        description: String,
    ) -> Self {
        Self {
            transaction,
            pid,
            since,
            description,
        }
    }
}

/// Most streams one [`StoreAdmin::list_streams`] call returns.
pub const MAX_LIST_LIMIT: usize = 10_000;

/// An operator's view of a store. Backends implement it with SQL and row decoding; callers
/// page with [`StoreAdmin::list_streams`]'s `after` cursor.
#[async_trait::async_trait]
pub trait StoreAdmin: EventStore {
    /// Every stream type with at least one event, with its counts, ordered by name.
    async fn stream_types(&self) -> Result<Vec<StreamTypeSummary>, StoreError>;

    /// Up to `limit` streams of `stream_type` whose id sorts after `after` (byte order), ordered
    /// by id. `limit` is capped at [`MAX_LIST_LIMIT`]; call [`validate_listing`] first.
    async fn list_streams(
        &self,
        stream_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StreamSummary>, StoreError>;

    /// Every checkpoint kept in this store, ordered by name.
    async fn checkpoints(&self) -> Result<Vec<CheckpointInfo>, StoreError>;

    /// Who holds the lease of projection `name` in this store, if anyone (a runner that uses
    /// this store as its projection backend).
    async fn lease_holder(&self, name: &str) -> Result<Option<LeaseHolder>, StoreError>;

    /// Every event projection `name` skipped on request, oldest first.
    async fn skipped(&self, name: &str) -> Result<Vec<SkippedEvent>, StoreError>;

    /// Projection `name`'s last failure as its runner recorded it in this store
    /// ([`ProjectionBackend::record_failure`](crate::backend::ProjectionBackend::record_failure)),
    /// if it has one.
    async fn last_failure(&self, name: &str) -> Result<Option<RecordedFailure>, StoreError>;

    /// What holds readers back.
    async fn horizon_report(&self) -> Result<HorizonReport, StoreError>;
}

/// Checks the arguments of [`StoreAdmin::list_streams`] the way every backend must, and returns
/// the limit to use (at least 1, at most [`MAX_LIST_LIMIT`]).
pub fn validate_listing(
    stream_type: &str,
    after: Option<&str>,
    limit: usize,
) -> Result<usize, InvalidId> {
    validate_name("stream type", stream_type, MAX_STREAM_TYPE_LEN)?;
    if let Some(after) = after {
        // An empty cursor sorts before every id; it is allowed, as "from the start".
        if !after.is_empty() {
            validate_name("stream id", after, MAX_STREAM_ID_LEN)?;
        }
    }
    Ok(limit.clamp(1, MAX_LIST_LIMIT))
}
