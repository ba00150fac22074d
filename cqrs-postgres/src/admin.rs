//! [`StoreAdmin`]: the listings an operator's tools need, one statement each (in `sql.rs`).

use chrono::{DateTime, Utc};
use cqrs_core::admin::{
    validate_listing, CheckpointInfo, HorizonHolderInfo, HorizonReport, LeaseHolder, StoreAdmin,
    StreamSummary, StreamTypeSummary,
};
use cqrs_core::backend::validate_checkpoint_name;
use cqrs_core::subscription::{RecordedFailure, SkippedEvent};
use cqrs_core::{Position, StoreError, StreamId, StreamVersion};
use sqlx::Row;

use crate::{row, PostgresProjections, PostgresStore};

fn count(value: i64) -> u64 {
    u64::try_from(value).unwrap_or_default()
}

/// Reads one column, naming the listing in the error.
fn column<'r, T>(row: &'r sqlx::postgres::PgRow, index: usize) -> Result<T, StoreError>
where
    T: sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres>,
{
    row.try_get(index)
        .map_err(|e| StoreError::Backend(Box::new(e)))
}

/// The PostgreSQL store's listings. Leases are those of runners on
/// [`PostgresProjections::new`] over this store (an advisory lock keyed by this schema); a read
/// database of its own ([`PostgresProjections::with_event_source`]) keeps its leases there.
#[async_trait::async_trait]
impl StoreAdmin for PostgresStore {
    async fn stream_types(&self) -> Result<Vec<StreamTypeSummary>, StoreError> {
        let rows = sqlx::query(self.sql.stream_types.clone())
            .fetch_all(&self.pool)
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
        let rows = sqlx::query(self.sql.list_streams.clone())
            .bind(stream_type)
            .bind(after.unwrap_or(""))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        rows.iter()
            .map(|row| {
                let id: String = column(row, 0)?;
                let version: i64 = column(row, 1)?;
                let at: DateTime<Utc> = column(row, 2)?;
                Ok(StreamSummary::new(
                    StreamId::new(stream_type, id),
                    StreamVersion::new(count(version)),
                    at,
                ))
            })
            .collect()
    }

    async fn checkpoints(&self) -> Result<Vec<CheckpointInfo>, StoreError> {
        let rows = sqlx::query(self.sql.list_checkpoints.clone())
            .fetch_all(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        rows.iter()
            .map(|row| {
                let tx: String = column(row, 1)?;
                let tx = row::parse_tx(&tx).map_err(|e| StoreError::Backend(e.into()))?;
                let sequence: i64 = column(row, 2)?;
                Ok(CheckpointInfo::new(
                    column(row, 0)?,
                    Position::new(tx, count(sequence)),
                    Some(column(row, 3)?),
                ))
            })
            .collect()
    }

    async fn lease_holder(&self, name: &str) -> Result<Option<LeaseHolder>, StoreError> {
        validate_checkpoint_name(name)?;
        let row = sqlx::query(self.sql.lease_holder.clone())
            .bind(self.schema())
            .bind(name)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        let Some(row) = row else { return Ok(None) };
        let pid: i32 = column(&row, 0)?;
        let mut description = format!("PostgreSQL session {pid}");
        for (label, index) in [("application", 1), ("client", 2), ("user", 3)] {
            let value: Option<String> = column(&row, index)?;
            if let Some(value) = value.filter(|v| !v.is_empty()) {
                description.push_str(&format!(", {label} {value}"));
            }
        }
        Ok(Some(LeaseHolder::new(
            Some(i64::from(pid)),
            description,
            column(&row, 4)?,
        )))
    }

    async fn skipped(&self, name: &str) -> Result<Vec<SkippedEvent>, StoreError> {
        validate_checkpoint_name(name)?;
        PostgresProjections::new(self.clone())
            .skipped_events(name)
            .await
    }

    async fn last_failure(&self, name: &str) -> Result<Option<RecordedFailure>, StoreError> {
        PostgresProjections::new(self.clone())
            .last_failure(name)
            .await
    }

    async fn horizon_report(&self) -> Result<HorizonReport, StoreError> {
        let horizon = self.horizon().await?;
        let held_by = horizon.held_by.as_ref().map(|holder| {
            let details: Vec<String> = [
                ("database", &holder.database),
                ("user", &holder.user),
                ("application", &holder.application_name),
                ("state", &holder.state),
                ("prepared transaction", &holder.prepared_gid),
            ]
            .into_iter()
            .filter_map(|(label, value)| {
                value
                    .as_deref()
                    .filter(|v| !v.is_empty())
                    .map(|v| format!("{label} {v}"))
            })
            .collect();
            HorizonHolderInfo::new(
                holder.xid.to_string(),
                holder.pid.map(i64::from),
                holder.since,
                details.join(", "),
            )
        });
        Ok(HorizonReport::new(
            horizon.waiting_events,
            held_by,
            horizon.to_string(),
        ))
    }
}
