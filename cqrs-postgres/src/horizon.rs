//! The visibility horizon of gap-free reads, and what holds it back.

use chrono::{DateTime, Utc};
use cqrs_core::StoreError;
use sqlx::postgres::PgRow;
use sqlx::Row;

use crate::error::map_error;
use crate::{row, PostgresStore};

impl PostgresStore {
    /// The visibility horizon and what holds it back: for a subscription's status ("held back by
    /// transaction N since T") when it seems stuck.
    pub async fn horizon(&self) -> Result<Horizon, StoreError> {
        let row = sqlx::query(self.sql.horizon_status.clone())
            .fetch_one(&self.pool)
            .await
            .map_err(|e| self.fail(e))?;
        horizon(&row)
    }
}

/// The visibility horizon of gap-free reads, from [`PostgresStore::horizon`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Horizon {
    /// The oldest running transaction id (`pg_snapshot_xmin`): [`EventStore::read_all`](cqrs_core::EventStore::read_all) returns
    /// only events written by transactions below it.
    pub xmin: u64,
    /// Events already committed but not yet readable because the horizon is below them.
    pub waiting_events: u64,
    /// The running transaction at the horizon, if it can be seen.
    pub held_by: Option<HorizonHolder>,
}

/// The transaction at the visibility horizon. Fields are `None` where PostgreSQL does not show them
/// to this role (`pg_stat_activity` hides other users' sessions unless `pg_read_all_stats`).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct HorizonHolder {
    /// Its transaction id.
    pub xid: u64,
    /// The backend process, for `pg_terminate_backend` (`None` for a prepared transaction).
    pub pid: Option<i32>,
    /// Its database (any database in the cluster holds the horizon).
    pub database: Option<String>,
    /// Its user.
    pub user: Option<String>,
    /// Its `application_name`.
    pub application_name: Option<String>,
    /// Its state (`active`, `idle in transaction`, ...).
    pub state: Option<String>,
    /// When its transaction started (for a prepared transaction: when it was prepared).
    pub since: Option<DateTime<Utc>>,
    /// The global id, if it is a prepared (two-phase) transaction.
    pub prepared_gid: Option<String>,
}

impl std::fmt::Display for Horizon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.held_by {
            None => write!(f, "horizon at transaction {}", self.xmin)?,
            Some(holder) => {
                write!(f, "held back by transaction {}", holder.xid)?;
                if let Some(since) = holder.since {
                    write!(f, " since {}", since.to_rfc3339())?;
                }
                match (&holder.prepared_gid, holder.pid) {
                    (Some(gid), _) => write!(f, " (prepared transaction `{gid}`)")?,
                    (None, Some(pid)) => {
                        write!(f, " (pid {pid}")?;
                        for (label, value) in [
                            ("database", &holder.database),
                            ("application", &holder.application_name),
                            ("state", &holder.state),
                        ] {
                            if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
                                write!(f, ", {label} {value}")?;
                            }
                        }
                        f.write_str(")")?;
                    }
                    (None, None) => {}
                }
            }
        }
        write!(f, "; {} committed events waiting", self.waiting_events)
    }
}

fn horizon(row: &PgRow) -> Result<Horizon, StoreError> {
    let get_text = |column: &str| -> Result<Option<String>, StoreError> {
        row.try_get(column).map_err(map_error)
    };
    let xmin_text: String = row.try_get("xmin").map_err(map_error)?;
    let xmin = row::parse_tx(&xmin_text).map_err(|e| StoreError::Backend(e.into()))?;
    let waiting: i64 = row.try_get("waiting").map_err(map_error)?;
    let pid: Option<i32> = row.try_get("pid").map_err(map_error)?;
    let prepared_gid = get_text("gid")?;
    let held_by = (pid.is_some() || prepared_gid.is_some())
        .then(|| -> Result<HorizonHolder, StoreError> {
            let started: Option<DateTime<Utc>> = row.try_get("xact_start").map_err(map_error)?;
            let prepared: Option<DateTime<Utc>> = row.try_get("prepared").map_err(map_error)?;
            Ok(HorizonHolder {
                xid: xmin,
                pid,
                database: get_text("datname")?,
                user: get_text("usename")?,
                application_name: get_text("application_name")?,
                state: get_text("state")?,
                since: started.or(prepared),
                prepared_gid: prepared_gid.clone(),
            })
        })
        .transpose()?;
    Ok(Horizon {
        xmin,
        waiting_events: u64::try_from(waiting).unwrap_or_default(),
        held_by,
    })
}
