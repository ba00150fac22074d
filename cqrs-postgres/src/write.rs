//! The write path: an append alone, grouped, or inside the caller's transaction, with its
//! inline projections and its announcement.

use std::sync::Arc;

use cqrs_core::{AppendResult, ExpectedVersion, NewEvent, StoreError, StreamId};
use sqlx::postgres::PgConnection;

use crate::error::{map_error, out_of_range};
use crate::{append, group, row, tx, PostgresStore};

impl PostgresStore {
    /// [`EventStore::append`](cqrs_core::EventStore::append): through group commit when it is on (and no inline projection
    /// runs), otherwise alone; then announced to listeners.
    pub(crate) async fn append_events(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let batch = Arc::new(append::encode(stream, &events)?);
        // Holding a group-commit slot while appending alone keeps this write counted as in
        // flight, so concurrent appends queue up and share the next group.
        let mut slot = None;
        let mut unsettled = false;
        if let Some(group) = self.group.as_ref().filter(|_| self.inline.is_empty()) {
            match group.append(stream, expected, &batch).await {
                group::Joined::Written(result) => {
                    self.announce(result.position);
                    return Ok(result);
                }
                // Alone (a group of one; or not settled by the group: a conflict, a retry, a
                // failed group), with the full checks, so this caller gets exactly its own result
                // or error.
                group::Joined::Alone(held) => slot = held,
                group::Joined::Unsettled => unsettled = true,
            }
        }
        let mut result = self
            .individual_append(stream, expected, &events, &batch, slot.as_mut())
            .await;
        drop(slot);
        if unsettled {
            result = result.map_err(still_unknown);
        }
        let result = result?;
        self.announce(result.position);
        Ok(result)
    }

    /// Appends inside the caller's transaction, so the events commit (or roll back) together with
    /// the caller's other writes: inline projections, an outbox. Same checks, idempotency and
    /// result as [`EventStore::append`](cqrs_core::EventStore::append); `conn` must be inside a transaction (pass
    /// `&mut *transaction`). Runs in a savepoint, so a conflict leaves the caller's transaction
    /// usable. The store's inline projections ([`PostgresStore::with_inline`]) run here too, in
    /// the same savepoint: if one fails, its writes and the events are undone together. The
    /// notification is sent when the caller commits.
    ///
    /// The events' `tx` is the caller's transaction id: while it stays open it holds every gap-free
    /// reader back, so keep such transactions short.
    pub async fn append_in(
        &self,
        conn: &mut PgConnection,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let batch = append::encode(stream, &events)?;
        if self.inline.is_empty() {
            return append::append_on(
                conn,
                &self.sql,
                stream,
                expected,
                &events,
                &batch,
                append::Mode::InTransaction,
            )
            .await
            .map(|appended| appended.result);
        }
        // Events and inline read-model writes are undone together if either fails, leaving the
        // caller's transaction usable and without events that no projection has seen.
        sqlx::raw_sql("SAVEPOINT cqrs_inline")
            .execute(&mut *conn)
            .await
            .map_err(append::savepoint_error)?;
        let outcome = async {
            let appended = append::append_on(
                conn,
                &self.sql,
                stream,
                expected,
                &events,
                &batch,
                append::Mode::InTransaction,
            )
            .await?;
            if appended.fresh {
                self.project_inline(conn, stream, &appended.result, events.len())
                    .await?;
            }
            Ok(appended.result)
        }
        .await;
        let end = if outcome.is_ok() {
            "RELEASE SAVEPOINT cqrs_inline"
        } else {
            "ROLLBACK TO SAVEPOINT cqrs_inline; RELEASE SAVEPOINT cqrs_inline"
        };
        sqlx::raw_sql(end)
            .execute(&mut *conn)
            .await
            .map_err(|e| self.fail(e))?;
        outcome
    }

    /// Runs the inline projections over the events just appended on `conn` (inside the append's
    /// transaction; the caller undoes everything on error).
    pub(crate) async fn project_inline(
        &self,
        conn: &mut PgConnection,
        stream: &StreamId,
        written: &AppendResult,
        count: usize,
    ) -> Result<(), StoreError> {
        let last = written.stream_version.get();
        let first = last.saturating_sub(count as u64);
        let version = |v: u64| i64::try_from(v).map_err(|_| out_of_range("stream version", v));
        let rows = sqlx::query(self.sql.read_back.clone())
            .bind(stream.stream_type())
            .bind(stream.id())
            .bind(version(first)?)
            .bind(version(last)?)
            .fetch_all(&mut *conn)
            .await
            .map_err(|e| self.fail(e))?;
        let events = rows
            .iter()
            .map(row::recorded)
            .collect::<Result<Vec<_>, _>>()?;
        self.inline.apply(&events, conn).await
    }

    pub(crate) async fn individual_append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: &[NewEvent],
        batch: &append::Encoded,
        mut slot: Option<&mut group::Slot>,
    ) -> Result<AppendResult, StoreError> {
        if !self.inline.is_empty() {
            let mut tx = tx::Tx::begin(&self.pool).await?;
            let appended = append::append_on(
                tx.conn(),
                &self.sql,
                stream,
                expected,
                events,
                batch,
                append::Mode::InTransaction,
            )
            .await?;
            if appended.fresh {
                self.project_inline(tx.conn(), stream, &appended.result, events.len())
                    .await?;
            }
            tx.commit().await?;
            if appended.fresh {
                // The statement notified, delivered on this commit.
                self.announcer()
                    .notified(appended.result.position, "append");
            }
            return Ok(appended.result);
        }
        let notifying = self.announcer().claim();
        let mode = if notifying {
            append::Mode::AloneNotifying
        } else {
            append::Mode::Alone
        };
        // A group-commit slot's connection, kept from its previous write, saves the pool's
        // round trips; the slot keeps it again if this append succeeds.
        let kept = slot.as_deref_mut().and_then(group::Slot::take_kept);
        let was_kept = kept.is_some();
        let mut conn = match kept {
            Some(conn) => conn,
            None => self.pool.acquire().await.map_err(map_error)?,
        };
        let mut result =
            append::append_on(&mut conn, &self.sql, stream, expected, events, batch, mode).await;
        if was_kept
            && matches!(
                result,
                Err(StoreError::Connection(_) | StoreError::OutcomeUnknown(_))
            )
        {
            // The kept connection went stale between two writes (it skipped the pool's health
            // check). Retrying is safe, and settles an unknown outcome: a batch that did commit
            // comes back as its original result.
            let unknown = matches!(result, Err(StoreError::OutcomeUnknown(_)));
            result = match self.pool.acquire().await {
                Ok(fresh) => {
                    conn = fresh;
                    append::append_on(&mut conn, &self.sql, stream, expected, events, batch, mode)
                        .await
                }
                Err(error) => Err(map_error(error)),
            };
            if unknown {
                result = result.map_err(still_unknown);
            }
        }
        let result = result.map(|appended| appended.result);
        if let (true, Ok(written)) = (notifying, &result) {
            self.announcer().notified(written.position, "append");
        }
        if let (Some(slot), Ok(_)) = (slot, &result) {
            slot.keep(conn);
        }
        result
    }
}

/// The error of a re-send after a write of the same events whose outcome is unknown: if the
/// re-send could not reach the store, it learned nothing, and the outcome is still unknown.
fn still_unknown(error: StoreError) -> StoreError {
    match error {
        StoreError::Connection(source) => StoreError::OutcomeUnknown(source),
        other => other,
    }
}
