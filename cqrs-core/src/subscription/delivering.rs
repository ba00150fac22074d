//! The runner of a [`Deliver`] projection: batches handed over ahead of their checkpoints.
//!
//! While batch N's delivery is awaited and its checkpoint commits, batch N+1 is already handed
//! over and batch N+2 read. The checkpoint still moves only past delivered batches, in order:
//! batch N's checkpoint-only commit starts after its own delivery resolved `Ok`, and after batch
//! N-1's commit. Whatever fails, every delivery handed over after the last committed checkpoint
//! is dropped, [`Projection::discard`] is called, and the runner starts again from that
//! checkpoint, so nothing is ever checkpointed that was not delivered.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;
use tokio::sync::watch;
use tracing::Instrument;

use super::{
    commit_guarded, read_batch, read_page, Committed, Live, Next, Page, ProjectionFailure,
    ProjectionRunner, ProjectionStatus, RunError,
};
use crate::backend::{panic_message, BatchError, ProjectionBackend, SkipTarget};
use crate::event::RecordedEvent;
use crate::projection::{Deliver, Delivery, Projection, ProjectionError};
use crate::stream::Position;
use crate::subscription::Progress;

/// How many batches a delivering runner has handed over and not yet checkpointed, at most:
/// one awaited and committing, the next one already on its way.
const HANDED_OVER: usize = 3;

/// [`Deliver::deliver`] of a projection type, as the runner stores it: set by
/// [`ProjectionRunner::delivering`], where `P: Deliver` is known.
pub(super) type DeliverFn<P> =
    for<'a> fn(&'a mut P, &'a [RecordedEvent]) -> BoxFuture<'a, Result<Delivery, ProjectionError>>;

pub(super) fn deliver_boxed<'a, P: Deliver>(
    projection: &'a mut P,
    events: &'a [RecordedEvent],
) -> BoxFuture<'a, Result<Delivery, ProjectionError>> {
    Box::pin(projection.deliver(events))
}

/// A batch handed over and not yet checkpointed.
pub(super) struct Handed {
    events: Vec<RecordedEvent>,
    to: Position,
    /// The read that produced it reached the head.
    caught_up: bool,
    delivery: Delivery,
}

/// How a handed-over batch ended: its delivery failed, or the outcome of its checkpoint's
/// commit (or a panic in its delivery).
type Settled = Result<Committed, ProjectionError>;

impl<P: Deliver, B: ProjectionBackend<P>> ProjectionRunner<P, B> {
    /// Runs the projection through [`Deliver`]: the runner hands batch N+1 over while batch N's
    /// [`Delivery`] is awaited and its checkpoint commits (a checkpoint-only commit per batch,
    /// after that batch's delivery and in order), instead of applying each batch inside its
    /// checkpoint's transaction. For projections whose effects leave through an outside system
    /// that acknowledges them (an outbox relay to a message broker): the broker's round trips
    /// and the checkpoint's commits overlap.
    ///
    /// Everything else is the same: the lease, the status, the failure policy (a failed
    /// delivery is the outside system's failure, retried from the checkpoint with backoff and
    /// never skippable; a [`Deliver::deliver`] error for one event stops right before it,
    /// skippable), [`ProjectionRunner::catch_up`] and [`ProjectionRunner::spawn`].
    pub fn delivering(mut self) -> Self {
        self.deliver = Some(deliver_boxed::<P>);
        self
    }
}

impl<P: Projection, B: ProjectionBackend<P>> ProjectionRunner<P, B> {
    /// Awaits a handed-over batch's delivery, then commits its checkpoint alone, from
    /// `expected` to `to`.
    async fn checkpoint_delivered(
        &mut self,
        expected: Option<Position>,
        events: usize,
        to: Position,
        delivery: Delivery,
    ) -> Settled {
        match AssertUnwindSafe(delivery).catch_unwind().await {
            Err(panic) => return Ok(Err(panic_message(panic.as_ref()))),
            Ok(Err(error)) => return Err(error),
            Ok(Ok(())) => {}
        }
        let metrics = self
            .metrics
            .get_or_insert_with(|| crate::metrics::ProjectionMetrics::new(&self.name));
        let started = Instant::now();
        let committed = commit_guarded(
            &*self.backend,
            &mut self.projection,
            &self.name,
            expected,
            &[],
            to,
        )
        .instrument(tracing::debug_span!(
            "projection_batch",
            projection = %self.name,
            events,
            from = ?expected,
            to = %to,
            delivered = true,
        ))
        .await;
        if matches!(committed, Ok(Ok(()))) {
            metrics.batch_committed(events, started.elapsed());
        }
        Ok(committed)
    }

    /// Drops every batch handed over and not checkpointed: the projection starts again from
    /// the checkpoint.
    pub(super) fn abandon_handed(&mut self, live: &mut Live) {
        if !live.handed.is_empty() {
            live.handed.clear();
            self.projection.discard();
        }
    }

    /// Checkpoints handed-over batches in order until at most `keep` remain; on a failure,
    /// abandons the rest and says what to do.
    async fn settle_handed(
        &mut self,
        live: &mut Live,
        status: &watch::Sender<ProjectionStatus>,
        keep: usize,
    ) -> Option<Next> {
        while live.handed.len() > keep {
            let Handed {
                events,
                to,
                caught_up,
                delivery,
            } = live.handed.pop_front()?;
            let settled = self
                .checkpoint_delivered(live.checkpoint, events.len(), to, delivery)
                .await;
            let next = match settled {
                Ok(committed) => {
                    self.settle(live, status, committed, &events, to, caught_up)
                        .await
                }
                Err(error) => {
                    // The outside system's failure: nothing of the batch is attributed to one
                    // event, so nothing is offered to skip.
                    let mut failure = ProjectionFailure::of_projection(&error);
                    failure.position = None;
                    live.failed_at = None;
                    self.failed(status, failure);
                    Next::Backoff
                }
            };
            // A lost lease (a checkpoint moved by another runner) also ends the pipeline.
            if !matches!(next, Next::Go) || live.lease.is_none() {
                self.abandon_handed(live);
                return Some(next);
            }
        }
        None
    }

    /// One step of a delivering live runner: read the batch after the last one handed over,
    /// hand it over, and checkpoint the batches before it while the next one is read.
    pub(super) async fn step_delivering(
        &mut self,
        live: &mut Live,
        status: &watch::Sender<ProjectionStatus>,
        deliver: DeliverFn<P>,
    ) -> Next {
        if let Some(next) = self.hold_lease(live, status).await {
            return next;
        }
        let limit = self.config.batch_size();
        let after = live
            .handed
            .back()
            .map(|h| h.to)
            .or(live.checkpoint)
            .unwrap_or(Position::START);
        let backend = std::sync::Arc::clone(&self.backend);
        let store = backend.events();
        let batch = match live.ahead.take().filter(|(cursor, _)| *cursor == after) {
            Some((_, read)) => read,
            None => read_batch(store, after, live.reader.types(), limit).await,
        };
        let (head, page) = match batch {
            Ok(batch) => batch,
            Err(error) => {
                // Checkpoint what was handed over first: an unreadable row is skippable only
                // right after the checkpoint.
                if let Some(next) = self.settle_handed(live, status, 0).await {
                    return next;
                }
                let failure = ProjectionFailure::of_store(&error);
                live.failed_at = failure.position.map(SkipTarget::unreadable);
                self.failed(status, failure);
                return Next::Backoff;
            }
        };
        let Page {
            mut events,
            complete,
        } = page;
        let (to, caught_up) = super::live_page_end(&events, complete, limit, head, after);
        live.reader.keep_handled(&mut events);
        if events.is_empty() && to <= after {
            if let Some(next) = self.settle_handed(live, status, 0).await {
                return next;
            }
            return Next::Wait(after);
        }
        let delivery: Delivery = if events.is_empty() {
            // Only moves the checkpoint past events the projection does not handle, in order.
            Box::pin(std::future::ready(Ok(())))
        } else {
            let handed = AssertUnwindSafe(deliver(&mut self.projection, &events))
                .catch_unwind()
                .await;
            match handed {
                Ok(Ok(delivery)) => delivery,
                Ok(Err(error)) => {
                    return self
                        .handover_failed(live, status, deliver, events, error)
                        .await
                }
                Err(panic) => {
                    let message = panic_message(panic.as_ref());
                    self.abandon_handed(live);
                    self.projection.discard();
                    live.failed_at = None;
                    self.failed(status, ProjectionFailure::panic(&message));
                    return Next::Backoff;
                }
            }
        };
        live.handed.push_back(Handed {
            events,
            to,
            caught_up,
            delivery,
        });
        // Caught up: checkpoint everything now (nothing to overlap with). Behind: keep one
        // batch on its way while the next one is read.
        let keep = if caught_up { 0 } else { HANDED_OVER - 1 };
        let reader = live.reader;
        let settled = if caught_up {
            self.settle_handed(live, status, keep).await
        } else {
            let read_next = read_batch(store, to, reader.types(), limit);
            let (settled, read) =
                futures_util::future::join(self.settle_handed(live, status, keep), read_next).await;
            if settled.is_none() {
                live.ahead = Some((to, read));
            }
            settled
        };
        settled.unwrap_or(Next::Go)
    }

    /// [`Deliver::deliver`] failed for `events`: checkpoint everything handed over before them,
    /// then, if the error names one of them, hand over and checkpoint the events before it, so
    /// the runner stops right before it (skippable there).
    async fn handover_failed(
        &mut self,
        live: &mut Live,
        status: &watch::Sender<ProjectionStatus>,
        deliver: DeliverFn<P>,
        events: Vec<RecordedEvent>,
        error: ProjectionError,
    ) -> Next {
        // Nothing of `events` was handed over; the batches before them were, and are settled
        // first (a discard now would drop them).
        if let Some(next) = self.settle_handed(live, status, 0).await {
            return next;
        }
        let index = error
            .position()
            .and_then(|p| events.iter().position(|e| e.position == p));
        let mut failure = ProjectionFailure::of_projection(&error);
        let Some(index) = index else {
            failure.position = None;
            live.failed_at = None;
            self.failed(status, failure);
            return Next::Backoff;
        };
        let mut right_before = true;
        if index > 0 {
            let prefix = events[..index].to_vec();
            let to = prefix[index - 1].position;
            right_before = match deliver(&mut self.projection, &prefix).await {
                Ok(delivery) => {
                    live.handed.push_back(Handed {
                        events: prefix,
                        to,
                        caught_up: false,
                        delivery,
                    });
                    self.settle_handed(live, status, 0).await.is_none()
                }
                Err(_) => {
                    self.projection.discard();
                    false
                }
            };
        }
        live.failed_at =
            (right_before && failure.skippable()).then(|| SkipTarget::of(&events[index]));
        if !right_before {
            failure.position = None;
        }
        self.failed(status, failure);
        Next::Backoff
    }

    /// `catch_up` of a delivering runner, with the lease held by the caller: like the plain
    /// catch-up, each batch handed over while the one before it is checkpointed and the next
    /// one read.
    pub(super) async fn catch_up_delivering(
        &mut self,
        deliver: DeliverFn<P>,
        mut progress: impl FnMut(Progress) + Send,
        count: bool,
    ) -> Result<(), RunError> {
        let backend = std::sync::Arc::clone(&self.backend);
        let store = backend.events();
        let Some(super::CatchUpStart {
            target,
            mut checkpoint,
            after,
            total,
        }) = super::catch_up_start(&*self.backend, &self.name, count).await?
        else {
            return Ok(());
        };
        let started = Instant::now();
        let mut done = 0u64;
        let limit = self.config.batch_size();
        let mut reader = super::LogReader::new(P::SUBSCRIPTION);
        let mut handed: VecDeque<Handed> = VecDeque::new();
        let mut next = Some(read_page(store, after, reader.types(), limit).await?);
        let outcome = async {
            while let Some(Page {
                mut events,
                complete,
            }) = next.take()
            {
                let to = super::trim_to_target(&mut events, complete, limit, target);
                reader.keep_handled(&mut events);
                let delivery: Delivery = if events.is_empty() {
                    Box::pin(std::future::ready(Ok(())))
                } else {
                    let handover = AssertUnwindSafe(deliver(&mut self.projection, &events))
                        .catch_unwind()
                        .await
                        .map_err(|panic| RunError::Panicked {
                            name: self.name.clone(),
                            message: panic_message(panic.as_ref()),
                        })?;
                    match handover {
                        Ok(delivery) => delivery,
                        Err(error) => {
                            // Nothing of `events` was handed over: settle the batches before.
                            let mut settle = SettleCatchUp {
                                checkpoint: &mut checkpoint,
                                done: &mut done,
                                total,
                                started,
                                progress: &mut progress,
                            };
                            self.settle_catch_up(&mut handed, 0, &mut settle).await?;
                            // Stop right before the failing event: its predecessors in the
                            // batch handed over and checkpointed on their own.
                            let index = error
                                .position()
                                .and_then(|p| events.iter().position(|e| e.position == p));
                            if let Some(index) = index.filter(|i| *i > 0) {
                                let prefix = events[..index].to_vec();
                                let to = prefix[index - 1].position;
                                if let Ok(delivery) = deliver(&mut self.projection, &prefix).await {
                                    handed.push_back(Handed {
                                        events: prefix,
                                        to,
                                        caught_up: false,
                                        delivery,
                                    });
                                    // The original failure is what the caller must see.
                                    let _ = self.settle_catch_up(&mut handed, 0, &mut settle).await;
                                }
                            }
                            return Err(RunError::Projection(error));
                        }
                    }
                };
                handed.push_back(Handed {
                    events,
                    to,
                    caught_up: false,
                    delivery,
                });
                let read_next = (to < target).then(|| read_page(store, to, reader.types(), limit));
                let keep = if read_next.is_some() {
                    HANDED_OVER - 1
                } else {
                    0
                };
                let mut settle = SettleCatchUp {
                    checkpoint: &mut checkpoint,
                    done: &mut done,
                    total,
                    started,
                    progress: &mut progress,
                };
                let settling = self.settle_catch_up(&mut handed, keep, &mut settle);
                let read = match read_next {
                    Some(read) => {
                        let (settled, read) = futures_util::future::join(settling, read).await;
                        settled?;
                        Some(read)
                    }
                    None => {
                        settling.await?;
                        None
                    }
                };
                next = read.transpose()?;
            }
            Ok(())
        }
        .await;
        if outcome.is_err() && !handed.is_empty() {
            handed.clear();
            self.projection.discard();
        }
        outcome
    }

    /// Checkpoints handed-over batches in order until at most `keep` remain.
    async fn settle_catch_up(
        &mut self,
        handed: &mut VecDeque<Handed>,
        keep: usize,
        settle: &mut SettleCatchUp<'_, impl FnMut(Progress) + Send>,
    ) -> Result<(), RunError> {
        while handed.len() > keep {
            let Some(Handed {
                events,
                to,
                delivery,
                ..
            }) = handed.pop_front()
            else {
                break;
            };
            let committed = self
                .checkpoint_delivered(*settle.checkpoint, events.len(), to, delivery)
                .await?;
            committed
                .map_err(|message| RunError::Panicked {
                    name: self.name.clone(),
                    message,
                })?
                .map_err(|error: BatchError| RunError::from(error))?;
            *settle.checkpoint = Some(to);
            *settle.done += events.len() as u64;
            let done = *settle.done;
            (settle.progress)(Progress {
                done,
                total: settle.total,
                rate: done as f64 / settle.started.elapsed().as_secs_f64().max(1e-9),
            });
        }
        Ok(())
    }
}

/// A delivering catch-up's running totals, moved as batches are checkpointed.
struct SettleCatchUp<'a, F> {
    checkpoint: &'a mut Option<Position>,
    done: &'a mut u64,
    total: u64,
    started: Instant,
    progress: &'a mut F,
}
