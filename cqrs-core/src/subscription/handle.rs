//! Observing and steering a spawned runner, and waiting for a checkpoint from anywhere.

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::{CheckpointProbe, Control, ProjectionState, ProjectionStatus, WaitError};
use crate::projection::Projection;
use crate::stream::Position;

/// Controls a spawned [`ProjectionRunner`](crate::subscription::ProjectionRunner) and observes its status.
pub struct ProjectionHandle<P> {
    pub(super) status: watch::Receiver<ProjectionStatus>,
    pub(super) control: mpsc::Sender<Control>,
    pub(super) shared: CheckpointProbe,
    pub(super) task: Option<JoinHandle<Option<P>>>,
}

impl<P> std::fmt::Debug for ProjectionHandle<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionHandle")
            .field("status", &*self.status.borrow())
            .finish_non_exhaustive()
    }
}

impl<P: Projection> ProjectionHandle<P> {
    /// The latest published status.
    pub fn status(&self) -> ProjectionStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status changes (for an error channel or a health endpoint).
    pub fn watch_status(&self) -> watch::Receiver<ProjectionStatus> {
        self.status.clone()
    }

    /// Waits until the projection has committed `position` (or anything after it). While this
    /// runner holds the lease its own status answers; otherwise (a standby, or a runner that
    /// failed or stopped) the checkpoint in the backend answers, which the active runner, maybe
    /// in another process, moves. Times out cleanly.
    pub async fn wait_for(&self, position: Position, timeout: Duration) -> Result<(), WaitError> {
        let deadline = Instant::now() + timeout;
        let mut status = self.status.clone();
        let mut interval = Duration::from_millis(2);
        let mut shared = None;
        loop {
            let (local, active) = {
                let s = status.borrow_and_update();
                let active = matches!(
                    s.state,
                    ProjectionState::Running | ProjectionState::Rebuilding
                );
                (s.checkpoint, active)
            };
            if local.is_some_and(|c| c >= position) {
                return Ok(());
            }
            if !active {
                shared = (self.shared)().await?;
                if shared.is_some_and(|c| c >= position) {
                    return Ok(());
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitError::Timeout {
                    name: status.borrow().name.clone(),
                    target: position,
                    reached: local.max(shared),
                    timeout,
                });
            }
            let left = deadline - now;
            let runner_alive = status.has_changed().is_ok();
            if active && runner_alive {
                tokio::select! {
                    _ = status.changed() => {}
                    () = tokio::time::sleep(left) => {}
                }
            } else {
                tokio::time::sleep(interval.min(left)).await;
                interval = (interval * 2).min(Duration::from_millis(50));
            }
        }
    }

    /// Skips the event at `position`, which must be the event the projection is failing on, with
    /// a skippable failure ([`ProjectionFailure::skippable`](crate::subscription::ProjectionFailure::skippable)). The backend records the skip.
    pub async fn skip(&self, position: Position) {
        // A closed channel means the runner ended; nothing left to skip.
        let _ = self.control.send(Control::Skip(position)).await;
    }

    /// Stops the runner at its last committed checkpoint and returns the projection (`None` if
    /// the runner had died of a panic).
    pub async fn stop(mut self) -> Option<P> {
        let _ = self.control.send(Control::Stop).await;
        match self.task.take() {
            Some(task) => task.await.ok().flatten(),
            None => None,
        }
    }

    /// Aborts the runner task immediately (as a crash would); the checkpoint stays where the last
    /// committed batch left it.
    pub fn abort(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

impl<P> Drop for ProjectionHandle<P> {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Waits until the checkpoint `name` reaches `position`, reading it from `checkpoints` (works across
/// processes: the runner may live elsewhere). Polls with a short, growing interval.
pub async fn wait_for(
    checkpoints: &dyn crate::checkpoint::CheckpointStore,
    name: &str,
    position: Position,
    timeout: Duration,
) -> Result<(), WaitError> {
    let deadline = Instant::now() + timeout;
    let mut interval = Duration::from_millis(2);
    loop {
        let reached = checkpoints.load_checkpoint(name).await?;
        if reached.is_some_and(|c| c >= position) {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(WaitError::Timeout {
                name: name.to_owned(),
                target: position,
                reached,
                timeout,
            });
        }
        tokio::time::sleep(interval.min(deadline - now)).await;
        interval = (interval * 2).min(Duration::from_millis(50));
    }
}
