//! Snapshots: an aggregate's state at a stream version, so loading replays only later events.

use async_trait::async_trait;
use serde_json::Value;

use crate::store::StoreError;
use crate::stream::{StreamId, StreamVersion};

/// An aggregate's encoded state after applying every event up to `stream_version`.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The aggregate's stream.
    pub stream: StreamId,
    /// The last event folded into the state.
    pub stream_version: StreamVersion,
    /// The aggregate's [`crate::Aggregate::SNAPSHOT_VERSION`] when it was taken; a snapshot with another
    /// version is ignored on load and the stream replayed.
    pub snapshot_version: u32,
    /// The encoded state.
    pub payload: Value,
}

/// Where snapshots live; one (the latest) per stream.
#[async_trait]
pub trait SnapshotStore: Send + Sync + 'static {
    /// The latest snapshot of `stream`, if any.
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError>;

    /// Stores `snapshot` unless a snapshot at a later stream version is already stored
    /// (so a slow writer never replaces a newer snapshot with an older one).
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError>;
}

/// When the repository takes a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPolicy {
    every: u64,
}

impl SnapshotPolicy {
    /// Snapshot whenever a command carries the stream across a multiple of `n` events (n >= 1).
    pub fn every(n: u64) -> Self {
        Self { every: n.max(1) }
    }

    /// Whether moving the stream from `before` to `after` should produce a snapshot.
    pub fn should_snapshot(&self, before: StreamVersion, after: StreamVersion) -> bool {
        after.get() / self.every > before.get() / self.every
    }
}
