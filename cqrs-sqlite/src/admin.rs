//! [`StoreAdmin`]: the listings an operator's tools need, one statement each (in `sql.rs`).

use chrono::{DateTime, Utc};
use cqrs_core::admin::{
    validate_listing, CheckpointInfo, HorizonReport, LeaseHolder, StoreAdmin, StreamSummary,
    StreamTypeSummary,
};
use cqrs_core::subscription::{RecordedFailure, SkippedEvent};
use cqrs_core::{Position, StoreError, StreamId, StreamVersion};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use crate::{lease, sql, SqliteProjections, SqliteStore};

fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or_default()
}

fn column<'r, T>(row: &'r SqliteRow, index: usize) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
{
    row.try_get(index)
        .map_err(|e| StoreError::Backend(Box::new(e)))
}

fn instant(micros: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::<Utc>::from_timestamp_micros(micros)
        .ok_or_else(|| StoreError::Backend(format!("timestamp {micros} out of range").into()))
}

/// The SQLite store's listings. Its log has no visibility horizon: writers commit one at a time
/// in position order, so nothing committed is ever held back. A lease is an operating-system lock
/// on a file beside the database: its holder is seen by trying the lock, which names no process.
#[async_trait::async_trait]
impl StoreAdmin for SqliteStore {
    async fn stream_types(&self) -> Result<Vec<StreamTypeSummary>, StoreError> {
        let rows = sqlx::query(sql::STREAM_TYPES)
            .fetch_all(self.pool())
            .await
            .map_err(|e| self.fail(e))?;
        rows.iter()
            .map(|row| {
                Ok(StreamTypeSummary::new(
                    column(row, 0)?,
                    count(column(row, 1)?),
                    count(column(row, 2)?),
                ))
            })
            .collect()
    }

    async fn list_streams(
        &self,
        stream_type: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<StreamSummary>, StoreError> {
        let limit = validate_listing(stream_type, after, limit)?;
        let rows = sqlx::query(sql::LIST_STREAMS)
            .bind(stream_type)
            .bind(after.unwrap_or(""))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(self.pool())
            .await
            .map_err(|e| self.fail(e))?;
        rows.iter()
            .map(|row| {
                let id: String = column(row, 0)?;
                let version: i64 = column(row, 1)?;
                Ok(StreamSummary::new(
                    StreamId::new(stream_type, id),
                    StreamVersion::new(count(version)),
                    instant(column(row, 2)?)?,
                ))
            })
            .collect()
    }

    async fn checkpoints(&self) -> Result<Vec<CheckpointInfo>, StoreError> {
        let rows = sqlx::query(sql::LIST_CHECKPOINTS)
            .fetch_all(self.pool())
            .await
            .map_err(|e| self.fail(e))?;
        rows.iter()
            .map(|row| {
                let tx: i64 = column(row, 1)?;
                let sequence: i64 = column(row, 2)?;
                Ok(CheckpointInfo::new(
                    column(row, 0)?,
                    Position::new(count(tx), count(sequence)),
                    Some(instant(column(row, 3)?)?),
                ))
            })
            .collect()
    }

    async fn lease_holder(&self, name: &str) -> Result<Option<LeaseHolder>, StoreError> {
        crate::validate_checkpoint_name(name)?;
        let file = lease::lock_path(self.path(), name);
        if !tokio::fs::try_exists(&file).await.unwrap_or(false) {
            // No runner ever took it: nothing to try (and no lock file to create).
            return Ok(None);
        }
        // Trying the lock is the only way to see it held; a free lock is released at once.
        match lease::acquire(self.path(), name, &self.shared.errors).await? {
            Some(free) => {
                drop(free);
                Ok(None)
            }
            None => Ok(Some(LeaseHolder::new(
                None,
                format!("a process holds the lock on {}", file.display()),
                None,
            ))),
        }
    }

    async fn skipped(&self, name: &str) -> Result<Vec<SkippedEvent>, StoreError> {
        SqliteProjections::new(self.clone())
            .skipped_events(name)
            .await
    }

    async fn last_failure(&self, name: &str) -> Result<Option<RecordedFailure>, StoreError> {
        SqliteProjections::new(self.clone())
            .last_failure(name)
            .await
    }

    async fn horizon_report(&self) -> Result<HorizonReport, StoreError> {
        Ok(HorizonReport::new(
            0,
            None,
            "SQLite commits in position order: nothing holds readers back".to_owned(),
        ))
    }
}
