//! The projection backend for read models in this process's memory.

use std::sync::Arc;
use std::time::Duration;

use super::{ProjectionFailure, RecordedFailure, SkippedEvent};
use crate::backend::{apply_batch, BatchError, Lease, ProjectionBackend, SkipTarget};
use crate::event::RecordedEvent;
use crate::projection::Projection;
use crate::store::{EventStore, StoreError};
use crate::stream::Position;

/// Runs projections whose read model lives in this process's memory (`Context = ()`), over any
/// event store. Checkpoints live here too, beside the read model they describe: both are gone when
/// the process ends, so a restarted process rebuilds its in-memory read models from the log instead
/// of trusting a durable checkpoint that no longer matches them.
///
/// Handlers apply one event at a time; after a failure the checkpoint is moved to the last applied
/// event, so the read model and its checkpoint never disagree. One lease per projection name: share
/// one `InProcess` (in an `Arc`, see [`ProjectionRunner::shared`](crate::subscription::ProjectionRunner::shared)) between runners that must
/// exclude each other.
pub struct InProcess<S> {
    store: S,
    checkpoints: crate::memory::InMemoryStore,
    leases: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    skipped: Arc<std::sync::Mutex<Vec<SkippedEvent>>>,
    failures: Arc<std::sync::Mutex<std::collections::HashMap<String, RecordedFailure>>>,
}

impl<S> std::fmt::Debug for InProcess<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcess")
            .field("leases", &*lock(&self.leases))
            .finish_non_exhaustive()
    }
}

impl<S: EventStore> InProcess<S> {
    /// Projections over `store`, with fresh checkpoints.
    pub fn new(store: S) -> Self {
        Self {
            store,
            checkpoints: crate::memory::InMemoryStore::new(),
            leases: Arc::default(),
            skipped: Arc::default(),
            failures: Arc::default(),
        }
    }

    /// Every event skipped on request, oldest first.
    pub fn skipped_events(&self) -> Vec<SkippedEvent> {
        lock(&self.skipped).clone()
    }

    /// The checkpoints of the projections run here (e.g. for [`wait_for`](crate::subscription::wait_for)).
    pub fn checkpoints(&self) -> &dyn crate::checkpoint::CheckpointStore {
        &self.checkpoints
    }
}

fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl<S: EventStore, P: Projection<Context = ()>> ProjectionBackend<P> for InProcess<S> {
    fn events(&self) -> &dyn EventStore {
        &self.store
    }

    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        use crate::checkpoint::CheckpointStore;
        self.checkpoints.load_checkpoint(name).await
    }

    async fn commit_batch(
        &self,
        projection: &mut P,
        name: &str,
        expected: Option<Position>,
        events: &[RecordedEvent],
        to: Position,
    ) -> Result<(), BatchError> {
        use crate::checkpoint::CheckpointStore;
        let actual = self.checkpoints.load_checkpoint(name).await?;
        if actual != expected {
            return Err(StoreError::CheckpointConflict {
                name: name.to_owned(),
                expected,
                actual,
            }
            .into());
        }
        // A read model in memory cannot be rolled back, so each event is its own unit (handled
        // and flushed): after a failure, the events before it stay applied and the checkpoint
        // moves to the last of them.
        for (index, event) in events.iter().enumerate() {
            if let Err((_, error)) =
                apply_batch(projection, std::slice::from_ref(event), &mut ()).await
            {
                if let Some(done) = index.checked_sub(1).map(|i| events[i].position) {
                    self.checkpoints
                        .save_checkpoint(name, expected, done)
                        .await?;
                }
                return Err(BatchError::Projection {
                    index,
                    committed: index,
                    error,
                });
            }
        }
        self.checkpoints.save_checkpoint(name, expected, to).await?;
        Ok(())
    }

    async fn reset_checkpoint(&self, name: &str) -> Result<(), StoreError> {
        use crate::checkpoint::CheckpointStore;
        self.checkpoints.delete_checkpoint(name).await
    }

    async fn record_skip(
        &self,
        name: &str,
        expected: Option<Position>,
        event: &SkipTarget,
        reason: &str,
    ) -> Result<(), StoreError> {
        use crate::checkpoint::CheckpointStore;
        self.checkpoints
            .save_checkpoint(name, expected, event.position)
            .await?;
        lock(&self.skipped).push(SkippedEvent {
            projection: name.to_owned(),
            position: event.position,
            event_type: event.event_type.clone(),
            reason: reason.to_owned(),
        });
        Ok(())
    }

    async fn skipped_events(&self, name: &str) -> Result<Vec<SkippedEvent>, StoreError> {
        let skipped = lock(&self.skipped);
        Ok(skipped
            .iter()
            .filter(|s| s.projection == name)
            .cloned()
            .collect())
    }

    async fn record_failure(
        &self,
        name: &str,
        failure: Option<&ProjectionFailure>,
    ) -> Result<(), StoreError> {
        crate::backend::validate_checkpoint_name(name)?;
        let mut failures = lock(&self.failures);
        match failure {
            Some(failure) => {
                let recorded =
                    RecordedFailure::new(name.to_owned(), failure.clone(), chrono::Utc::now());
                failures.insert(name.to_owned(), recorded);
            }
            None => {
                failures.remove(name);
            }
        }
        Ok(())
    }

    async fn last_failure(&self, name: &str) -> Result<Option<RecordedFailure>, StoreError> {
        crate::backend::validate_checkpoint_name(name)?;
        Ok(lock(&self.failures).get(name).cloned())
    }

    async fn acquire_lease(&self, name: &str) -> Result<Option<Box<dyn Lease>>, StoreError> {
        if !lock(&self.leases).insert(name.to_owned()) {
            return Ok(None);
        }
        Ok(Some(Box::new(LocalLease {
            leases: Arc::clone(&self.leases),
            name: name.to_owned(),
        })))
    }

    async fn wait_for_append(&self, after: Position, timeout: Duration) {
        self.store.wait_for_append(after, timeout).await;
    }
}

struct LocalLease {
    leases: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
    name: String,
}

#[async_trait::async_trait]
impl Lease for LocalLease {
    async fn is_held(&mut self) -> bool {
        true
    }
}

impl Drop for LocalLease {
    fn drop(&mut self) {
        lock(&self.leases).remove(&self.name);
    }
}
