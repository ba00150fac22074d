//! The headline guarantee, shown: a read model in PostgreSQL, built by `PostgresProjections`,
//! survives its runner dying mid-way and ends up with every event applied exactly once.
//!
//! Each batch's read-model writes and its checkpoint commit in one transaction, so a runner that
//! dies (here: aborted while it is catching up) leaves the read model and the checkpoint
//! agreeing; the next runner resumes from the checkpoint and applies the rest.

use std::io::Write;
use std::time::Duration;

use cqrs_core::prelude::*;
use cqrs_core::subscription::{ProjectionRunner, ProjectionState, RunnerConfig};
use cqrs_core::{event, projection, CheckpointStore, NewEvent};
use cqrs_postgres::{PostgresProjections, PostgresStore};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgConnection;
use sqlx::AssertSqlSafe;

/// Money paid into an account.
#[event(name = "restart.Paid")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Paid {
    /// Amount in cents.
    pub amount: i64,
}

/// Total paid and number of payments per account, in table `<schema>.paid_totals`.
#[derive(Debug, Clone)]
pub struct PaidTotals {
    table: String,
}

#[projection(name = "paid_totals")]
impl PaidTotals {
    async fn paid(
        &mut self,
        event: &Paid,
        meta: &RecordedEvent,
        db: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} AS t (account, total, payments) VALUES ($1, $2, 1)
             ON CONFLICT (account) DO UPDATE
             SET total = t.total + EXCLUDED.total, payments = t.payments + 1",
            self.table
        )))
        .bind(meta.stream.id())
        .bind(event.amount)
        .execute(db)
        .await?;
        Ok(())
    }
}

/// What the demo saw.
#[derive(Debug, Clone, PartialEq)]
pub struct RestartReport {
    /// Payments appended.
    pub appended: i64,
    /// Where the first runner's checkpoint was when it died.
    pub died_at: Option<Position>,
    /// Payments in the read model at the end (each counted once per application).
    pub applied: i64,
    /// Sum of the read model's totals.
    pub total: i64,
    /// Sum of the appended amounts.
    pub expected_total: i64,
}

/// Appends `payments` payments over 10 accounts, runs the read model's projection until it is
/// part-way through, kills it, starts a new runner, and compares the read model with the log.
pub async fn demo(
    store: PostgresStore,
    payments: i64,
    out: &mut impl Write,
) -> Result<RestartReport, Box<dyn std::error::Error + Send + Sync>> {
    let table = format!("\"{}\".paid_totals", store.schema());
    sqlx::raw_sql(AssertSqlSafe(format!(
        "DROP TABLE IF EXISTS {table};
         CREATE TABLE {table} (account text PRIMARY KEY, total bigint NOT NULL, payments bigint NOT NULL)"
    )))
    .execute(store.pool())
    .await?;
    let projections = PostgresProjections::new(store.clone());
    projections
        .store()
        .delete_checkpoint(PaidTotals::NAME)
        .await?;

    let mut expected_total = 0;
    let mut last = Position::START;
    for n in 0..payments {
        let account = StreamId::new("restart-account", format!("acc-{}", n % 10));
        let amount = 1 + n % 7;
        expected_total += amount;
        let written = store
            .append(
                &account,
                ExpectedVersion::Any,
                vec![NewEvent::from_event(&Paid { amount })?],
            )
            .await?;
        last = written.position;
    }
    writeln!(out, "appended {payments} payments")?;

    // Small batches, so the first runner is caught part-way through.
    let config = RunnerConfig::builder().batch_size(20).build()?;
    let first = ProjectionRunner::new(
        PaidTotals {
            table: table.clone(),
        },
        projections.clone(),
    )
    .with_config(config)
    .spawn();
    let mut status = first.watch_status();
    tokio::time::timeout(
        Duration::from_secs(30),
        status.wait_for(|s| s.state == ProjectionState::Running && s.checkpoint.is_some()),
    )
    .await??;
    // A crash: the task is dropped wherever it is, possibly inside a batch's transaction.
    first.abort();
    let died_at = projections
        .store()
        .load_checkpoint(PaidTotals::NAME)
        .await?;
    let at = died_at.map_or_else(|| "the start".to_owned(), |p| p.to_string());
    writeln!(
        out,
        "the first runner died with its checkpoint at {at} (the log ends at {last})"
    )?;

    let second = ProjectionRunner::new(
        PaidTotals {
            table: table.clone(),
        },
        projections,
    )
    .with_config(config)
    .spawn();
    second.wait_for(last, Duration::from_secs(60)).await?;
    second.stop().await;

    let (applied, total): (i64, i64) = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT COALESCE(sum(payments), 0)::bigint, COALESCE(sum(total), 0)::bigint FROM {table}"
    )))
    .fetch_one(store.pool())
    .await?;
    writeln!(
        out,
        "a second runner resumed from the checkpoint: {applied} payments applied, total {total} (the log says {payments} and {expected_total}): exactly once"
    )?;
    Ok(RestartReport {
        appended: payments,
        died_at,
        applied,
        total,
        expected_total,
    })
}
