//! Grouped loads: concurrent replays of different streams (the loads of commands that missed the
//! aggregate cache) share one statement. Under load, commands often start on streams the cache has
//! not seen, several at once (new aggregates, a restart, an evicted working set), and each load is
//! a round trip whose cost is mostly fixed; read together, they cost about one.
//!
//! Leader/follower, with one read in flight at a time, like group commit's writes. A load that
//! finds no read in flight leads: under load it yields to the runtime while loads keep queueing
//! (so that runnable ones join), then reads its own stream and every queued one in one statement.
//! With nothing queued it reads alone, with the single-stream statement, so a lone client pays
//! nothing. A load that finds a read in flight queues; when the read is done, the oldest queued
//! load is told to lead the rest. Whatever the group cannot settle for a follower (a failed
//! statement, an unreadable row, a cancelled leader) goes back to it, and it reads alone: every
//! caller gets exactly the events or the error its own read would give.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use cqrs_core::{ReplayEvent, StoreError, StreamId, StreamVersion};
use sqlx::Row;
use tokio::sync::oneshot;

use crate::group::yield_while_growing;
use crate::{row, PostgresStore};

/// The most loads read in one statement.
const MAX_GROUP: usize = 64;

/// The loads queued behind the read in flight.
#[derive(Default)]
pub(crate) struct LoadGroup {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Request>,
    /// A read is in flight (a group's, or a lone load's): loads that arrive meanwhile queue.
    reading: bool,
    /// How many loads the last read took: more than one means loads arrive together, and a new
    /// leader lets runnable ones join before it reads.
    last_group: usize,
}

struct Request {
    stream: StreamId,
    from: StreamVersion,
    limit: usize,
    reply: oneshot::Sender<Reply>,
}

enum Reply {
    /// The group read the follower's stream.
    Read(Vec<ReplayEvent>),
    /// The follower reads alone.
    Alone,
    /// The read in flight is done: the follower leads the loads still queued. The guard travels
    /// with the message, so a follower cancelled after it was sent still hands the queue on.
    Lead(Reading),
}

/// What a load gets from the group.
pub(crate) enum Load {
    /// The events, read with the group.
    Read(Vec<ReplayEvent>),
    /// The caller reads alone. With `Some`, its read counts as in flight (loads arriving
    /// meanwhile queue for the next group) until the guard is dropped: keep it until the read is
    /// done.
    Alone(Option<Reading>),
}

/// The read in flight. Dropped (also with a cancelled holder, or unreceived in a `Lead` reply), it
/// hands the queue to its oldest load whose caller still waits.
pub(crate) struct Reading {
    /// `None` once disarmed: a `Lead` reply that could not be delivered.
    loads: Option<Arc<LoadGroup>>,
}

impl Drop for Reading {
    fn drop(&mut self) {
        let Some(loads) = self.loads.take() else {
            return;
        };
        let mut state = loads.state();
        while let Some(next) = state.queue.pop_front() {
            let lead = Reading {
                loads: Some(Arc::clone(&loads)),
            };
            match next.reply.send(Reply::Lead(lead)) {
                Ok(()) => return,
                // Its caller is gone: the next one leads. The undelivered guard must not hand
                // over again (this lock is held).
                Err(mut undelivered) => {
                    if let Reply::Lead(lead) = &mut undelivered {
                        lead.loads = None;
                    }
                }
            }
        }
        state.reading = false;
    }
}

impl LoadGroup {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Loads `limit` events of `stream` from `from` with the loads of other callers, or tells the
    /// caller to read alone.
    pub(crate) async fn load(
        self: &Arc<Self>,
        store: &PostgresStore,
        stream: &StreamId,
        from: StreamVersion,
        limit: usize,
    ) -> Load {
        let queued = {
            let mut state = self.state();
            if state.reading {
                let (reply, replied) = oneshot::channel();
                state.queue.push_back(Request {
                    stream: stream.clone(),
                    from,
                    limit,
                    reply,
                });
                Some(replied)
            } else {
                state.reading = true;
                None
            }
        };
        let reading = match queued {
            None => Reading {
                loads: Some(Arc::clone(self)),
            },
            Some(replied) => match replied.await {
                Ok(Reply::Read(events)) => return Load::Read(events),
                // A dropped reply: the leader was cancelled.
                Ok(Reply::Alone) | Err(_) => return Load::Alone(None),
                Ok(Reply::Lead(reading)) => reading,
            },
        };
        self.let_runnable_loads_join().await;
        let group: Vec<Request> = {
            let mut state = self.state();
            let take = state.queue.len().min(MAX_GROUP - 1);
            let group: Vec<Request> = state.queue.drain(..take).collect();
            state.last_group = group.len() + 1;
            group
        };
        cqrs_core::metrics::load_group("postgres", group.len() + 1);
        if group.is_empty() {
            return Load::Alone(Some(reading));
        }
        let own = read_group(store, (stream, from, limit), group).await;
        drop(reading);
        match own {
            Some(events) => Load::Read(events),
            None => Load::Alone(None),
        }
    }

    /// Yields to the runtime while the queue keeps growing (a few times at most), so that loads
    /// of tasks already runnable join this read. Only when loads came together last time or are
    /// queued now: a lone client never yields.
    async fn let_runnable_loads_join(&self) {
        let queued = {
            let state = self.state();
            if state.last_group <= 1 && state.queue.is_empty() {
                return;
            }
            state.queue.len()
        };
        yield_while_growing(queued, || self.state().queue.len()).await;
    }
}

/// Reads the leader's stream (`own`) and the followers' in one statement, replies to each
/// follower, and returns the leader's events (`None`: it reads alone).
async fn read_group(
    store: &PostgresStore,
    own: (&StreamId, StreamVersion, usize),
    group: Vec<Request>,
) -> Option<Vec<ReplayEvent>> {
    let (stream, from, limit) = own;
    let members = group.len() + 1;
    let mut stream_types = Vec::with_capacity(members);
    let mut stream_ids = Vec::with_capacity(members);
    let mut froms = Vec::with_capacity(members);
    let mut limits = Vec::with_capacity(members);
    let mut total = 0_usize;
    let own = std::iter::once((stream, from, limit));
    for (stream, from, limit) in own.chain(group.iter().map(|r| (&r.stream, r.from, r.limit))) {
        stream_types.push(stream.stream_type());
        stream_ids.push(stream.id());
        froms.push(i64::try_from(from.get()).unwrap_or(i64::MAX));
        limits.push(i64::try_from(limit).unwrap_or(i64::MAX));
        total = total.saturating_add(limit);
    }
    let query = || {
        sqlx::query(store.sql.read_streams_for_replay.clone())
            .bind(&stream_types)
            .bind(&stream_ids)
            .bind(&froms)
            .bind(&limits)
    };
    // Each row with its member (`n`, 1-based: the leader is 1), or `None` if it cannot be read.
    let decode = |row: &sqlx::postgres::PgRow| -> Result<_, StoreError> {
        let member: Option<usize> = row
            .try_get::<i64, _>(row::replay_col::MEMBER)
            .ok()
            .and_then(|n| usize::try_from(n).ok());
        Ok((member, row::replayed(row)))
    };
    let rows = store.rows_for_load(query, total, decode).await;
    let mut events: Vec<Vec<ReplayEvent>> = (0..members).map(|_| Vec::new()).collect();
    let mut unreadable = vec![false; members];
    let read = match rows {
        Ok(rows) => {
            for (member, event) in rows {
                match (member.and_then(|n| n.checked_sub(1)), event) {
                    (Some(i), Some(event)) if i < members => events[i].push(event),
                    (Some(i), None) if i < members => unreadable[i] = true,
                    // A row that names no member: no member's events can be trusted.
                    _ => unreadable.iter_mut().for_each(|u| *u = true),
                }
            }
            true
        }
        Err(error) => {
            tracing::debug!(%error, loads = members, "grouped load failed; loading individually");
            false
        }
    };
    tracing::trace!(loads = members, "grouped load");
    // Each member's rows in version order: the statement has no overall ORDER BY, though each
    // member's rows normally arrive in it (one index range scan each), and then this only checks.
    for events in &mut events {
        events.sort_by_key(|event| event.stream_version);
    }
    let mut settled = events
        .into_iter()
        .zip(unreadable)
        .map(|(events, unreadable)| (read && !unreadable).then_some(events));
    let own = settled.next().flatten();
    for (request, events) in group.into_iter().zip(settled) {
        let _ = request.reply.send(events.map_or(Reply::Alone, Reply::Read));
    }
    own
}
