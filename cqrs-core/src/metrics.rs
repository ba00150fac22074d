//! The metrics the framework records, through the [`metrics`](https://docs.rs/metrics) facade:
//! install a recorder (for example `metrics-exporter-prometheus`) to collect them. Without one,
//! recording is a call into the facade's no-op recorder: no lock and no I/O; a command builds its
//! metric keys (a few small allocations), a runner registers its handles once, when it first
//! commits. Install the recorder before starting runners: a
//! handle registered before it stays a no-op.
//!
//! Every name is here, with its labels:
//!
//! | name | kind | labels | what |
//! | --- | --- | --- | --- |
//! | `cqrs_commands_total` | counter | `aggregate`, `outcome` | commands executed by [`Repository`](crate::Repository): `outcome` is `ok`, `rejected` (a domain error), `conflicted` (a concurrency conflict after the retries) or `failed` (storage, encoding) |
//! | `cqrs_command_retries_total` | counter | `aggregate` | re-executions after a concurrency conflict |
//! | `cqrs_command_duration_seconds` | histogram | `aggregate` | a command from load to outcome, retries included |
//! | `cqrs_append_duration_seconds` | histogram | `aggregate` | one append of a command's events (re-sends included) |
//! | `cqrs_events_appended_total` | counter | `aggregate` | events appended by commands |
//! | `cqrs_group_commit_size` | histogram | `backend` | appends written together by one group commit (PostgreSQL, SQLite) |
//! | `cqrs_load_group_size` | histogram | `backend` | commands' loads (stream replays) a leader read together in one statement, 1 for a load that found no other queued (PostgreSQL with group commit); a member that reads again alone after its group failed is not counted again |
//! | `cqrs_notifications_total` | counter | `backend`, `carried_by` | append notifications the store committed (PostgreSQL's `NOTIFY`): `carried_by` is `append` (in an append's own statement), `group` (in a group commit's statement) or `background` (a `NOTIFY` of its own, after the last append of a burst); those of `append_in` are the caller's |
//! | `cqrs_projection_events_applied_total` | counter | `projection` | events a runner applied and committed |
//! | `cqrs_projection_batch_commit_seconds` | histogram | `projection` | one batch: handlers, flush and checkpoint commit |
//! | `cqrs_projection_lag` | gauge | `projection` | events of its types after its checkpoint, as the runner last counted |
//! | `cqrs_projection_state_changes_total` | counter | `projection`, `state` | a live runner entering a state (`starting`, `running`, `standby`, `failed`, `stopped`) |

use std::time::Duration;

/// `cqrs_commands_total`.
pub const COMMANDS: &str = "cqrs_commands_total";
/// `cqrs_command_retries_total`.
pub const COMMAND_RETRIES: &str = "cqrs_command_retries_total";
/// `cqrs_command_duration_seconds`.
pub const COMMAND_DURATION: &str = "cqrs_command_duration_seconds";
/// `cqrs_append_duration_seconds`.
pub const APPEND_DURATION: &str = "cqrs_append_duration_seconds";
/// `cqrs_events_appended_total`.
pub const EVENTS_APPENDED: &str = "cqrs_events_appended_total";
/// `cqrs_group_commit_size`.
pub const GROUP_COMMIT_SIZE: &str = "cqrs_group_commit_size";
/// `cqrs_load_group_size`.
pub const LOAD_GROUP_SIZE: &str = "cqrs_load_group_size";
/// `cqrs_notifications_total`.
pub const NOTIFICATIONS: &str = "cqrs_notifications_total";
/// `cqrs_projection_events_applied_total`.
pub const PROJECTION_EVENTS_APPLIED: &str = "cqrs_projection_events_applied_total";
/// `cqrs_projection_batch_commit_seconds`.
pub const PROJECTION_BATCH_COMMIT: &str = "cqrs_projection_batch_commit_seconds";
/// `cqrs_projection_lag`.
pub const PROJECTION_LAG: &str = "cqrs_projection_lag";
/// `cqrs_projection_state_changes_total`.
pub const PROJECTION_STATE_CHANGES: &str = "cqrs_projection_state_changes_total";

/// How a command ended, the `outcome` label of [`COMMANDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CommandOutcome {
    Ok,
    Rejected,
    Conflicted,
    Failed,
}

impl CommandOutcome {
    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Rejected => "rejected",
            Self::Conflicted => "conflicted",
            Self::Failed => "failed",
        }
    }
}

pub(crate) fn command(aggregate: &'static str, outcome: CommandOutcome, took: Duration) {
    metrics::counter!(COMMANDS, "aggregate" => aggregate, "outcome" => outcome.label())
        .increment(1);
    metrics::histogram!(COMMAND_DURATION, "aggregate" => aggregate).record(took.as_secs_f64());
}

pub(crate) fn command_retry(aggregate: &'static str) {
    metrics::counter!(COMMAND_RETRIES, "aggregate" => aggregate).increment(1);
}

pub(crate) fn appended(aggregate: &'static str, events: usize, took: Duration) {
    metrics::histogram!(APPEND_DURATION, "aggregate" => aggregate).record(took.as_secs_f64());
    metrics::counter!(EVENTS_APPENDED, "aggregate" => aggregate).increment(events as u64);
}

/// Records the size of a group commit; for backends.
pub fn group_commit(backend: &'static str, appends: usize) {
    metrics::histogram!(GROUP_COMMIT_SIZE, "backend" => backend).record(appends as f64);
}

/// Records how many loads one statement read; for backends.
pub fn load_group(backend: &'static str, loads: usize) {
    metrics::histogram!(LOAD_GROUP_SIZE, "backend" => backend).record(loads as f64);
}

/// Counts a notification of appends that a store committed, `carried_by` one of `append`,
/// `group` or `background` (see the table above); for backends.
pub fn notification(backend: &'static str, carried_by: &'static str) {
    metrics::counter!(NOTIFICATIONS, "backend" => backend, "carried_by" => carried_by).increment(1);
}

/// A runner's handles, registered once so that recording a batch costs no allocation.
pub(crate) struct ProjectionMetrics {
    applied: metrics::Counter,
    commit: metrics::Histogram,
    lag: metrics::Gauge,
    name: String,
    /// The last state recorded, to count changes only.
    state: Option<&'static str>,
}

impl ProjectionMetrics {
    pub(crate) fn new(projection: &str) -> Self {
        let name = projection.to_owned();
        Self {
            applied: metrics::counter!(PROJECTION_EVENTS_APPLIED, "projection" => name.clone()),
            commit: metrics::histogram!(PROJECTION_BATCH_COMMIT, "projection" => name.clone()),
            lag: metrics::gauge!(PROJECTION_LAG, "projection" => name.clone()),
            name,
            state: None,
        }
    }

    pub(crate) fn batch_committed(&self, events: usize, took: Duration) {
        self.commit.record(took.as_secs_f64());
        self.applied.increment(events as u64);
    }

    /// Records the status's lag and, if it changed, its state.
    pub(crate) fn observe(&mut self, status: &crate::subscription::ProjectionStatus) {
        use crate::subscription::ProjectionState;
        if let Some(lag) = status.lag {
            self.lag.set(lag as f64);
        }
        let state = match status.state {
            ProjectionState::Starting => "starting",
            ProjectionState::Standby => "standby",
            ProjectionState::Running => "running",
            ProjectionState::Rebuilding => "rebuilding",
            ProjectionState::Failed => "failed",
            ProjectionState::Stopped => "stopped",
        };
        if self.state != Some(state) {
            self.state = Some(state);
            metrics::counter!(PROJECTION_STATE_CHANGES, "projection" => self.name.clone(), "state" => state)
                .increment(1);
        }
    }
}
