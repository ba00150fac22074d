//! Inline projections: read models a store runs inside each append's own transaction.

use std::sync::Arc;

use async_trait::async_trait;

use super::apply_batch;
use crate::event::RecordedEvent;
use crate::projection::{Projection, ProjectionError};
use crate::store::StoreError;

/// The inline projections of a store whose appends run in a transaction on a connection of type
/// `C`. Each registered projection is cloned for every append and run on the events just
/// appended, through [`apply_batch`], on the append's connection; the clone is dropped afterwards,
/// so a projection keeps its read model in the database. Cheap to clone (shared list).
pub struct InlineProjections<C> {
    projections: Arc<[Arc<dyn Inline<C>>]>,
}

impl<C> Clone for InlineProjections<C> {
    fn clone(&self) -> Self {
        Self {
            projections: Arc::clone(&self.projections),
        }
    }
}

impl<C> Default for InlineProjections<C> {
    fn default() -> Self {
        Self {
            projections: Arc::new([]),
        }
    }
}

impl<C> std::fmt::Debug for InlineProjections<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl<C: Send + 'static> InlineProjections<C> {
    /// This list and `projection` after it (the list itself is left as it is: stores are
    /// configured by value).
    pub fn with<P>(&self, projection: P) -> Self
    where
        P: Projection<Context = C> + Clone + Sync,
    {
        let mut projections = self.projections.to_vec();
        projections.push(Arc::new(Registered(projection)));
        Self {
            projections: projections.into(),
        }
    }

    /// Runs every projection, in registration order, on `events` (just appended, in order) on
    /// the append's connection. A failure is [`StoreError::InlineProjection`]: the caller undoes
    /// the append with the projections' writes.
    pub async fn apply(&self, events: &[RecordedEvent], conn: &mut C) -> Result<(), StoreError> {
        for projection in self.projections.iter() {
            projection
                .apply(events, conn)
                .await
                .map_err(StoreError::InlineProjection)?;
        }
        Ok(())
    }
}

impl<C> InlineProjections<C> {
    /// Whether no projection is registered (the store can then skip reading its events back).
    pub fn is_empty(&self) -> bool {
        self.projections.is_empty()
    }

    /// The registered projections' names, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.projections.iter().map(|p| p.name()).collect()
    }
}

/// One registered projection, type-erased.
#[async_trait]
trait Inline<C>: Send + Sync {
    fn name(&self) -> &'static str;

    async fn apply(&self, events: &[RecordedEvent], conn: &mut C) -> Result<(), ProjectionError>;
}

struct Registered<P>(P);

#[async_trait]
impl<P> Inline<P::Context> for Registered<P>
where
    P: Projection + Clone + Sync,
{
    fn name(&self) -> &'static str {
        P::NAME
    }

    async fn apply(
        &self,
        events: &[RecordedEvent],
        conn: &mut P::Context,
    ) -> Result<(), ProjectionError> {
        // A failure drops the clone, and with it anything it buffered.
        let mut projection = self.0.clone();
        apply_batch(&mut projection, events, conn)
            .await
            .map_err(|(_, error)| error)
    }
}
