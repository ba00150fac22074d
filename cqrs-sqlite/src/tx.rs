//! Write transactions outside the writer (checkpoints, snapshots, projection batches).
//!
//! Every write transaction starts with `BEGIN IMMEDIATE`: it takes SQLite's write lock before
//! reading, so it never has to upgrade a read lock (a deferred transaction that upgrades gets
//! `SQLITE_BUSY` at once, whatever the busy timeout). Inside one process writers first queue on
//! the store's write gate, an async mutex, so they wait for each other without SQLite's
//! sleep-and-retry busy handler; the busy timeout is then only spent waiting for other processes.
//!
//! A transaction dropped before [`Tx::commit`] (an error, a cancelled future) closes its
//! connection instead of returning it to the pool mid-transaction; closing rolls back.

use std::sync::Arc;

use cqrs_core::StoreError;
use sqlx::pool::PoolConnection;
use sqlx::sqlite::{Sqlite, SqliteConnection, SqlitePool};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::error::Errors;

pub(crate) struct Tx {
    conn: PoolConnection<Sqlite>,
    /// The transaction ended (committed or rolled back): the connection may go back to the pool.
    ended: bool,
    errors: Errors,
    _gate: OwnedMutexGuard<()>,
}

impl Tx {
    pub(crate) async fn begin(
        pool: &SqlitePool,
        gate: &Arc<Mutex<()>>,
        errors: &Errors,
    ) -> Result<Self, StoreError> {
        let gate = Arc::clone(gate).lock_owned().await;
        // The guard exists before `BEGIN` is sent: from here on, a cancellation closes the
        // connection instead of returning it to the pool mid-transaction.
        let mut tx = Self {
            conn: pool.acquire().await.map_err(|e| errors.map(e))?,
            ended: false,
            errors: errors.clone(),
            _gate: gate,
        };
        sqlx::raw_sql("BEGIN IMMEDIATE")
            .execute(tx.conn())
            .await
            .map_err(|e| tx.errors.map(e))?;
        Ok(tx)
    }

    /// The transaction's connection.
    pub(crate) fn conn(&mut self) -> &mut SqliteConnection {
        &mut self.conn
    }

    /// Commits; see [`Errors::map_commit`] for what a failure means.
    pub(crate) async fn commit(mut self) -> Result<(), StoreError> {
        sqlx::raw_sql("COMMIT")
            .execute(self.conn())
            .await
            .map_err(|e| self.errors.map_commit(e))?;
        self.ended = true;
        Ok(())
    }

    /// Rolls back. An error here means the connection is gone (and the transaction with it).
    pub(crate) async fn rollback(mut self) -> Result<(), StoreError> {
        sqlx::raw_sql("ROLLBACK")
            .execute(self.conn())
            .await
            .map_err(|e| self.errors.map(e))?;
        self.ended = true;
        Ok(())
    }
}

#[async_trait::async_trait]
impl cqrs_core::backend::BatchTransaction for Tx {
    type Conn = SqliteConnection;

    fn conn(&mut self) -> &mut SqliteConnection {
        Tx::conn(self)
    }

    async fn commit(self) -> Result<(), StoreError> {
        Tx::commit(self).await
    }

    async fn rollback(self) -> Result<(), StoreError> {
        Tx::rollback(self).await
    }
}

impl Drop for Tx {
    fn drop(&mut self) {
        if !self.ended {
            self.conn.close_on_drop();
        }
    }
}
