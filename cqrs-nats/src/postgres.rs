//! The [`Inbox`] of a PostgreSQL read model: the event store's `processed_events` table (through
//! [`PostgresProjections::first_delivery`]) and a table of skipped messages.

use cqrs_core::{EventId, StoreError};
use cqrs_postgres::PostgresProjections;
use sqlx::PgConnection;

use crate::consumer::Inbox;

fn table(projections: &PostgresProjections) -> String {
    let schema = projections.store().schema().replace('"', "\"\"");
    format!("\"{schema}\".nats_skipped_messages")
}

fn backend(error: sqlx::Error) -> StoreError {
    StoreError::Backend(error.into())
}

/// Creates the table of skipped messages in the store's schema (idempotent; run it at start,
/// after the store's own migrations).
pub async fn migrate(projections: &PostgresProjections) -> Result<(), StoreError> {
    let statement = format!(
        "CREATE TABLE IF NOT EXISTS {} (
             consumer text NOT NULL,
             sequence bigint NOT NULL,
             event_id uuid,
             reason text NOT NULL,
             skipped_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (consumer, sequence)
         )",
        table(projections)
    );
    sqlx::query(sqlx::AssertSqlSafe(statement))
        .execute(projections.store().pool())
        .await
        .map_err(backend)?;
    Ok(())
}

/// The messages `consumer` skipped: (JetStream sequence, event id if readable, reason), oldest
/// first.
pub async fn skipped_messages(
    projections: &PostgresProjections,
    consumer: &str,
) -> Result<Vec<(u64, Option<EventId>, String)>, StoreError> {
    let query = format!(
        "SELECT sequence, event_id, reason FROM {} WHERE consumer = $1 ORDER BY sequence",
        table(projections)
    );
    let rows: Vec<(i64, Option<uuid::Uuid>, String)> = sqlx::query_as(sqlx::AssertSqlSafe(query))
        .bind(consumer)
        .fetch_all(projections.store().pool())
        .await
        .map_err(backend)?;
    Ok(rows
        .into_iter()
        .map(|(sequence, id, reason)| {
            (
                u64::try_from(sequence).unwrap_or_default(),
                id.map(EventId::from_uuid),
                reason,
            )
        })
        .collect())
}

impl Inbox<PgConnection> for PostgresProjections {
    async fn first_delivery(
        &self,
        context: &mut PgConnection,
        consumer: &str,
        event: EventId,
    ) -> Result<bool, StoreError> {
        PostgresProjections::first_delivery(self, context, consumer, event).await
    }

    /// Recorded before the checkpoint moves (in its own statement): a crash in between leaves
    /// the message failing again with its skip already recorded, and skipping it again is
    /// idempotent.
    async fn record_skip(
        &self,
        consumer: &str,
        sequence: u64,
        event: Option<EventId>,
        reason: &str,
    ) -> Result<(), StoreError> {
        let statement = format!(
            "INSERT INTO {} (consumer, sequence, event_id, reason) VALUES ($1, $2, $3, $4)
             ON CONFLICT DO NOTHING",
            table(self)
        );
        let sequence = i64::try_from(sequence)
            .map_err(|_| StoreError::Backend(format!("sequence {sequence} out of range").into()))?;
        sqlx::query(sqlx::AssertSqlSafe(statement))
            .bind(consumer)
            .bind(sequence)
            .bind(event.map(|e| *e.as_uuid()))
            .bind(reason)
            .execute(self.store().pool())
            .await
            .map_err(backend)?;
        Ok(())
    }
}
