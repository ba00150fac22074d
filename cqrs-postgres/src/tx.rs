//! Transactions that survive cancellation.
//!
//! `sqlx`'s `Pool::begin` is not cancel-safe: a future dropped after `BEGIN` was sent but before
//! the transaction object exists leaves the connection inside a server-side transaction that
//! nobody owns, and the connection goes back to the pool. Every later statement on it, an
//! append included, then runs in that transaction and is never committed, and the transaction
//! holds the visibility horizon back for every reader in the cluster. Runners are cancelled in
//! normal operation (`ProjectionHandle::abort`, dropped handles, shutdown), so the store begins
//! its own transactions with [`Tx`]: a connection that is closed, never returned to the pool
//! (nor kept by group commit), unless the transaction ended with a commit or a rollback.

use std::sync::Arc;

use cqrs_core::StoreError;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnection, PgPool, Postgres};
use sqlx::Executor;

use crate::error::{map_error, map_sent_write_error};
use crate::group::GroupCommitter;

/// A transaction on a pooled connection. Dropped without [`Tx::commit`] or [`Tx::rollback`] (an
/// error, a cancelled future), it closes the connection, and PostgreSQL rolls the transaction back.
pub(crate) struct Tx {
    /// Always `Some` until dropped.
    conn: Option<PoolConnection<Postgres>>,
    /// The transaction ended (committed or rolled back): the connection may go back to the pool.
    ended: bool,
    /// Where the connection goes once the transaction ended: kept by group commit for the next
    /// write (see [`Tx::begin_kept`]), or back to the pool.
    keeper: Option<Arc<GroupCommitter>>,
}

impl Tx {
    pub(crate) async fn begin(pool: &PgPool) -> Result<Self, StoreError> {
        Self::begin_with(pool, "BEGIN").await
    }

    /// Begins with `statements` (`BEGIN` and `SET LOCAL`s, one round trip; static text only).
    pub(crate) async fn begin_with(
        pool: &PgPool,
        statements: &'static str,
    ) -> Result<Self, StoreError> {
        let conn = pool.acquire().await.map_err(map_error)?;
        Self::begin_on(conn, statements, None).await
    }

    /// [`Tx::begin_with`] on a connection that group commit keeps idle between writes, if it
    /// has one, and kept again once the transaction ended: a run of transactions (a projection's
    /// batches) then skips the pool's two round trips per checkout. A kept connection that went
    /// stale (it skipped the pool's check) is left, and the transaction begins on a pooled one.
    pub(crate) async fn begin_kept(
        pool: &PgPool,
        keeper: Option<&Arc<GroupCommitter>>,
        statements: &'static str,
    ) -> Result<Self, StoreError> {
        if let Some(keeper) = keeper {
            if let Some(conn) = keeper.borrow_kept() {
                match Self::begin_on(conn, statements, Some(Arc::clone(keeper))).await {
                    Err(StoreError::Connection(_)) => {}
                    begun => return begun,
                }
            }
        }
        let conn = pool.acquire().await.map_err(map_error)?;
        Self::begin_on(conn, statements, keeper.cloned()).await
    }

    async fn begin_on(
        conn: PoolConnection<Postgres>,
        statements: &'static str,
        keeper: Option<Arc<GroupCommitter>>,
    ) -> Result<Self, StoreError> {
        // The guard exists before `BEGIN` is sent: from here on, a cancellation closes the
        // connection instead of returning it to the pool mid-transaction.
        let mut tx = Self {
            conn: Some(conn),
            ended: false,
            keeper,
        };
        sqlx::raw_sql(statements)
            .execute(tx.conn())
            .await
            .map_err(map_error)?;
        Ok(tx)
    }

    /// The transaction's connection.
    #[allow(clippy::expect_used)] // `conn` is `Some` until the drop
    pub(crate) fn conn(&mut self) -> &mut PgConnection {
        self.conn
            .as_mut()
            .expect("a transaction's connection is taken only when it is dropped")
    }

    /// Commits; the connection goes back to the pool only if this succeeds. A connection lost
    /// once `COMMIT` was sent is [`StoreError::OutcomeUnknown`]: the server may have committed
    /// before the reply was lost.
    pub(crate) async fn commit(mut self) -> Result<(), StoreError> {
        self.conn()
            .execute("COMMIT")
            .await
            .map_err(|e| map_sent_write_error(e, map_error))?;
        self.ended = true;
        Ok(())
    }

    /// Rolls back; the connection goes back to the pool only if this succeeds. An error here
    /// means the connection is gone (the server rolled back with it).
    pub(crate) async fn rollback(mut self) -> Result<(), StoreError> {
        self.conn().execute("ROLLBACK").await.map_err(map_error)?;
        self.ended = true;
        Ok(())
    }
}

#[async_trait::async_trait]
impl cqrs_core::backend::BatchTransaction for Tx {
    type Conn = PgConnection;

    fn conn(&mut self) -> &mut PgConnection {
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
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if !self.ended {
            // Ending the session rolls the transaction back on the server.
            conn.close_on_drop();
            return;
        }
        if let Some(keeper) = &self.keeper {
            keeper.give_back(conn);
        }
    }
}
