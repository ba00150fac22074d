//! Checkpoints: how far a projection has read the global log.

use async_trait::async_trait;

use crate::store::StoreError;
use crate::stream::Position;

/// Longest checkpoint (or consumer) name accepted, in bytes: it is the key of an index.
pub const MAX_CHECKPOINT_NAME_LEN: usize = 1024;

/// Durable projection checkpoints with compare-and-set, so two runners can never both advance one.
#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    /// The position `name` has processed up to, or `None` if it never ran (or was reset).
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError>;

    /// Moves `name` from `expected` to `new`. Fails with [`StoreError::CheckpointConflict`] and changes
    /// nothing if the stored checkpoint is not `expected`.
    async fn save_checkpoint(
        &self,
        name: &str,
        expected: Option<Position>,
        new: Position,
    ) -> Result<(), StoreError>;

    /// Forgets `name`'s checkpoint, so it replays from the start (a rebuild).
    async fn delete_checkpoint(&self, name: &str) -> Result<(), StoreError>;
}
