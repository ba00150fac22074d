//! Projection checkpoints: compare-and-set, also inside a caller's transaction.

use async_trait::async_trait;
use cqrs_core::{CheckpointStore, Position, StoreError};
use sqlx::postgres::{PgConnection, PgRow};
use sqlx::Row;

use crate::error::{map_error, out_of_range};
use crate::{row, PostgresStore};

impl PostgresStore {
    /// [`CheckpointStore::load_checkpoint`] on the caller's connection (inside its transaction).
    pub async fn load_checkpoint_in(
        &self,
        conn: &mut PgConnection,
        name: &str,
    ) -> Result<Option<Position>, StoreError> {
        validate_checkpoint_name(name)?;
        let row = sqlx::query(self.sql.load_checkpoint.clone())
            .bind(name)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.fail(e))?;
        row.as_ref().map(checkpoint_position).transpose()
    }

    /// [`CheckpointStore::save_checkpoint`] (compare-and-set) on the caller's connection, so a
    /// projection commits its read-model writes and its checkpoint in one transaction. On
    /// [`StoreError::CheckpointConflict`] nothing changed; roll back and re-read.
    pub async fn save_checkpoint_in(
        &self,
        conn: &mut PgConnection,
        name: &str,
        expected: Option<Position>,
        new: Position,
    ) -> Result<(), StoreError> {
        validate_checkpoint_name(name)?;
        let sequence = |p: Position| {
            i64::try_from(p.sequence).map_err(|_| out_of_range("position sequence", p.sequence))
        };
        let done = match expected {
            None => {
                sqlx::query(self.sql.insert_checkpoint.clone())
                    .bind(name)
                    .bind(new.tx.to_string())
                    .bind(sequence(new)?)
                    .execute(&mut *conn)
                    .await
            }
            Some(old) => {
                sqlx::query(self.sql.update_checkpoint.clone())
                    .bind(name)
                    .bind(new.tx.to_string())
                    .bind(sequence(new)?)
                    .bind(old.tx.to_string())
                    .bind(sequence(old)?)
                    .execute(&mut *conn)
                    .await
            }
        }
        .map_err(|e| self.fail(e))?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        Err(StoreError::CheckpointConflict {
            name: name.to_owned(),
            expected,
            actual: self.load_checkpoint_in(conn, name).await?,
        })
    }
}

/// Longest checkpoint name accepted, in bytes; also the limit for the consumer names of
/// [`PostgresProjections::first_delivery`](crate::PostgresProjections::first_delivery).
pub use cqrs_core::checkpoint::MAX_CHECKPOINT_NAME_LEN;

fn validate_checkpoint_name(name: &str) -> Result<(), StoreError> {
    validate_key_name("checkpoint name", name)
}

/// The core's rule for checkpoint names ([`cqrs_core::backend::validate_checkpoint_name`]),
/// for every name stored as an index key (checkpoints, first-delivery consumers).
pub(crate) fn validate_key_name(what: &'static str, name: &str) -> Result<(), StoreError> {
    cqrs_core::backend::validate_checkpoint_name(name).map_err(|mut invalid| {
        invalid.what = what;
        StoreError::InvalidId(invalid)
    })
}

pub(crate) fn checkpoint_position(row: &PgRow) -> Result<Position, StoreError> {
    let tx: String = row.try_get("tx_text").map_err(map_error)?;
    let sequence: i64 = row.try_get("position").map_err(map_error)?;
    Ok(Position::new(
        row::parse_tx(&tx).map_err(|e| StoreError::Backend(e.into()))?,
        u64::try_from(sequence)
            .map_err(|_| StoreError::Backend(format!("negative checkpoint {sequence}").into()))?,
    ))
}

#[async_trait]
impl CheckpointStore for PostgresStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_error)?;
        self.load_checkpoint_in(&mut conn, name).await
    }

    async fn save_checkpoint(
        &self,
        name: &str,
        expected: Option<Position>,
        new: Position,
    ) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_error)?;
        self.save_checkpoint_in(&mut conn, name, expected, new)
            .await
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<(), StoreError> {
        validate_checkpoint_name(name)?;
        sqlx::query(self.sql.delete_checkpoint.clone())
            .bind(name)
            .execute(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(())
    }
}
