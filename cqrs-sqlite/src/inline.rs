//! Inline projections: read models updated inside the append's own transaction.

use async_trait::async_trait;
use cqrs_core::backend::apply_batch;
use cqrs_core::{Projection, ProjectionError, RecordedEvent};
use sqlx::sqlite::SqliteConnection;

/// A projection run inside appends, type-erased.
#[async_trait]
pub(crate) trait Inline: Send + Sync {
    fn name(&self) -> &'static str;

    /// Applies `events` (just appended, in order) on the append's transaction.
    async fn apply(
        &self,
        events: &[RecordedEvent],
        conn: &mut SqliteConnection,
    ) -> Result<(), ProjectionError>;
}

/// Runs `P` on a fresh clone per append: its state lives in the database, never in the value.
pub(crate) struct InlineProjection<P>(pub P);

#[async_trait]
impl<P> Inline for InlineProjection<P>
where
    P: Projection<Context = SqliteConnection> + Clone + Sync,
{
    fn name(&self) -> &'static str {
        P::NAME
    }

    async fn apply(
        &self,
        events: &[RecordedEvent],
        conn: &mut SqliteConnection,
    ) -> Result<(), ProjectionError> {
        // On error the clone, and anything it buffered, is dropped with the rolled-back append.
        let mut projection = self.0.clone();
        apply_batch(&mut projection, events, conn)
            .await
            .map_err(|(_, error)| error)
    }
}
