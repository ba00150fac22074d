//! Snapshots: the latest per stream, never replaced by an older one.

use async_trait::async_trait;
use cqrs_core::{Snapshot, SnapshotStore, StoreError, StreamId, StreamVersion};
use sqlx::Row;

use crate::error::{map_error, out_of_range};
use crate::PostgresStore;

#[async_trait]
impl SnapshotStore for PostgresStore {
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        stream.validate()?;
        let row = sqlx::query(self.sql.load_snapshot.clone())
            .bind(stream.stream_type())
            .bind(stream.id())
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        let Some(row) = row else { return Ok(None) };
        let version: i64 = row.try_get("stream_version").map_err(map_error)?;
        let snapshot_version: i64 = row.try_get("snapshot_version").map_err(map_error)?;
        let payload: String = row.try_get("payload_text").map_err(map_error)?;
        // An unreadable snapshot is no snapshot: the repository replays the stream.
        let (Ok(payload), Ok(snapshot_version), Ok(version)) = (
            serde_json::from_str(&payload),
            u32::try_from(snapshot_version),
            u64::try_from(version),
        ) else {
            tracing::warn!(%stream, "ignoring an unreadable snapshot");
            return Ok(None);
        };
        Ok(Some(Snapshot {
            stream: stream.clone(),
            stream_version: StreamVersion::new(version),
            snapshot_version,
            payload,
        }))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        snapshot.stream.validate()?;
        cqrs_core::backend::validate_snapshot(&snapshot)?;
        let version = snapshot.stream_version.get();
        sqlx::query(self.sql.save_snapshot.clone())
            .bind(snapshot.stream.stream_type())
            .bind(snapshot.stream.id())
            .bind(i64::try_from(version).map_err(|_| out_of_range("stream version", version))?)
            .bind(i64::from(snapshot.snapshot_version))
            .bind(snapshot.payload.to_string())
            .execute(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(())
    }
}
