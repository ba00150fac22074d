//! Group commit: concurrent appends to different streams share one statement and one commit.
//! Whatever the group cannot settle for a caller (a refused expectation, a retry of stored ids, a
//! failed statement) goes back to that caller, who appends alone with the full checks; so every
//! caller gets exactly the result or error an individual append would give. An append whose
//! stream is queued or being written already is not queued at all: its caller appends alone at
//! once, so a hot stream's appends race on the unique index as without group commit, instead of
//! each waiting a whole write for a later group.
//!
//! Leader/follower, with no dedicated task. At most `max_in_flight` writes are in flight at once,
//! each holding a slot ([`Slot`]); an append joins the queue, and if a slot is free its caller
//! takes it and leads: under load it yields to the runtime (so that appends from tasks already
//! runnable can join), then writes what is queued (its own append included) as one group. A group
//! of one is written by its caller with the individual statement (cheaper than the group's), and
//! that caller holds the slot until its write is done. Followers wait for their leader's reply.
//! When a write ends and appends are queued, its slot passes to a new leader for them. A lone
//! client therefore pays nothing for the feature (every append is a group of one, written as
//! usual); under load the queue fills while the slots are busy, and groups grow by themselves.
//! A slot keeps its connection from write to write (if the pool has another idle): passed from
//! leader to leader while appends are queued, and put aside for the next slot taken when the
//! queue runs dry, for at most [`GroupCommit::keep_connection`]. So back-to-back writes, even a
//! lone client's, skip the pool's per-checkout round trips.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::time::{Duration, Instant};

use cqrs_core::{AppendResult, ExpectedVersion, Position, StreamId};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgPool, Postgres};
use sqlx::Row;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::append::{expected_code, to_version, Encoded};
use crate::error::{connection_failed, is_version_collision};
use crate::load::LoadGroup;
use crate::notify::Announcer;
use crate::row::parse_tx;
use crate::sql::Statements;

/// Group-commit settings for [`crate::PostgresStore::with_group_commit`]: start from
/// `GroupCommit::default()` and change what you need with the `with_*` methods.
///
/// ```
/// use std::time::Duration;
/// use cqrs_postgres::GroupCommit;
///
/// let config = GroupCommit::default()
///     .with_max_in_flight(2)
///     .with_keep_connection(Duration::from_millis(50));
/// assert_eq!(config.max_batch, GroupCommit::default().max_batch);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupCommit {
    /// The most appends written together (at least 1).
    pub max_batch: usize,
    /// How long a leader waits for more appends before writing its group. `Duration::ZERO` (the
    /// default) sets no timer: the leader only yields to the runtime, so that tasks already
    /// runnable can join, then writes what is queued. Groups then form from appends that arrive
    /// while other groups are in flight, without adding latency.
    pub max_wait: Duration,
    /// The most writes in flight at once (at least 1): groups, or appends written alone (a
    /// group of one), each on its own pooled connection. Appends that find every slot busy queue
    /// and go in the next group. Fewer slots make larger groups (fewer statements and commits);
    /// more slots keep more of the pool busy.
    ///
    /// 1 (the default) writes one group at a time while the next one forms, as PostgreSQL
    /// flushes its WAL: the largest groups and the least CPU per append. Its cost: the appends
    /// queued behind a write that waits, for instance on the row lock of a concurrent, not yet
    /// committed append of the same stream version in another transaction, wait with it. An
    /// append still queued after 50 ms leads the queue from an extra slot (at most
    /// `max_in_flight` extra), so a stuck write delays the others by that much, and an
    /// application whose open transaction waits for one of them does not deadlock. 2 keeps a
    /// second write going from the start.
    pub max_in_flight: usize,
    /// How long a kept connection waits for its next use. Each slot keeps the connection of its
    /// last write for the next one; reusing it skips the pool's round trips (sqlx pings a
    /// connection when it is checked out and when it is given back), which on a fast network is
    /// a good part of a single-event append. A command's load (the store's `read_stream`) runs
    /// on a kept connection that is idle, and keeps the one it had to take from the pool in the
    /// same way (at most two beyond one per slot). The store never keeps the pool's last idle
    /// connection, and idle connections go back within about this long (also when the store is
    /// dropped). `Duration::ZERO` gives every connection back after its use.
    pub keep_connection: Duration,
}

impl Default for GroupCommit {
    /// 64 appends per group, no waiting, 1 write in flight, connections kept for 20 ms.
    fn default() -> Self {
        Self {
            max_batch: 64,
            max_wait: Duration::ZERO,
            max_in_flight: 1,
            keep_connection: Duration::from_millis(20),
        }
    }
}

impl GroupCommit {
    /// The most appends written together; values below 1 count as 1.
    pub fn with_max_batch(mut self, appends: usize) -> Self {
        self.max_batch = appends;
        self
    }

    /// How long a leader waits for more appends before writing its group.
    pub fn with_max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// The most writes in flight at once; values below 1 count as 1.
    pub fn with_max_in_flight(mut self, writes: usize) -> Self {
        self.max_in_flight = writes;
        self
    }

    /// How long a slot keeps its connection after its last write.
    pub fn with_keep_connection(mut self, keep: Duration) -> Self {
        self.keep_connection = keep;
        self
    }
}

/// At most this many yields before a leader takes its group (with `max_wait` zero): see
/// [`GroupCommitter::let_runnable_tasks_join`]. One yield already takes in most of the
/// runnable appends; the bound only keeps a leader from yielding forever under a steady stream.
const JOIN_YIELDS: usize = 4;

/// Connections kept aside for loads, beyond one per write slot (see
/// [`GroupCommitter::put_aside`]). Under load a slot's connection is busy writing, and the loads of
/// the commands that miss the aggregate cache (a stream's first command, a stale entry) run beside
/// it; two cover the loads of a few clients at once without keeping much of a pool.
const KEPT_FOR_LOADS: usize = 2;

/// How long an append waits in the queue before it may lead from an extra slot (see
/// [`GroupCommitter::extra_slot`]). Far above a healthy write (about a millisecond for a group of
/// eight here); an extra slot for a write that is merely slow only adds a write in flight.
const STUCK_AFTER: Duration = Duration::from_millis(50);

/// How many times a group is written again after colliding with a concurrent write of one of its
/// streams' versions, before its members append alone. Each collision needs a writer that
/// committed while the group's statement ran, so a second one in a row is already rare.
const GROUP_COLLISION_RETRIES: usize = 2;

struct Request {
    stream: StreamId,
    expected: i64,
    batch: Arc<Encoded>,
    reply: oneshot::Sender<Joined>,
}

/// What became of an append that joined the queue.
pub(crate) enum Joined {
    /// The group wrote it.
    Written(AppendResult),
    /// The caller appends alone. With `Some(slot)`, its write counts as in flight (no other group
    /// starts in its place) until the slot is dropped: keep it until the write is done.
    Alone(Option<Slot>),
    /// The caller appends alone (re-sends), because the group's write may have stored its events
    /// without a readable reply: if the re-send cannot reach the store, the outcome is unknown,
    /// not "nothing was written".
    Unsettled,
}

#[derive(Default)]
struct State {
    queue: Vec<Request>,
    /// Slots taken: writes in flight (groups, or appends written alone by a slot's holder).
    slots: usize,
    /// Streams with an append taken from the queue whose write is not done yet, with how many.
    writing: HashMap<StreamId, usize>,
    /// Connections of freed slots, kept for the next slot taken (at most one per slot), with the
    /// time each was put here.
    spare: Vec<(PoolConnection<Postgres>, Instant)>,
    /// The reaper task that gives spare connections back to the pool: started with the first.
    reaper: Option<JoinHandle<()>>,
    /// How many appends the last group took: more than one means appends are arriving while
    /// writes are in flight, and a new leader lets runnable tasks join before taking its group.
    last_group: usize,
}

pub(crate) struct GroupCommitter {
    config: GroupCommit,
    pool: PgPool,
    sql: Arc<Statements>,
    /// The store's announcer (started by the store's first append): a group claims the
    /// interval's notification like an append written alone, so that under load announcing
    /// rides on the groups' statements.
    announcer: Arc<OnceLock<Arc<Announcer>>>,
    state: Mutex<State>,
    /// Wakes the reaper when a spare connection is put aside.
    spare_put: Arc<Notify>,
    /// Commands' loads, grouped as the writes are (see [`crate::load`]).
    pub(crate) loads: Arc<LoadGroup>,
}

impl Drop for GroupCommitter {
    fn drop(&mut self) {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(reaper) = state.reaper.take() {
            reaper.abort();
        }
        let spare = std::mem::take(&mut state.spare);
        if tokio::runtime::Handle::try_current().is_ok() {
            // Back to the pool (sqlx checks each on its way, in a task).
            return;
        }
        // Dropped outside any runtime (after it shut down): sqlx cannot take a connection back
        // there (it would spawn a task, and panic). Detached, a connection just closes its
        // socket and frees its place in the pool; a pool that keeps `min_connections` would
        // still spawn to replace it, so there the connection is let go without a word.
        let replaces = self.pool.options().get_min_connections() > 0;
        for (conn, _) in spare {
            if replaces {
                std::mem::forget(conn);
            } else {
                drop(conn.detach());
            }
        }
    }
}

impl GroupCommitter {
    pub(crate) fn new(
        pool: PgPool,
        sql: Arc<Statements>,
        announcer: Arc<OnceLock<Arc<Announcer>>>,
        config: GroupCommit,
    ) -> Arc<Self> {
        Arc::new(Self {
            config: GroupCommit {
                max_batch: config.max_batch.max(1),
                max_in_flight: config.max_in_flight.max(1),
                ..config
            },
            pool,
            sql,
            announcer,
            state: Mutex::default(),
            spare_put: Arc::new(Notify::new()),
            loads: Arc::default(),
        })
    }

    pub(crate) fn config(&self) -> GroupCommit {
        self.config
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends `batch` as part of a group, or tells the caller to append alone.
    pub(crate) async fn append(
        self: &Arc<Self>,
        stream: &StreamId,
        expected: ExpectedVersion,
        batch: &Arc<Encoded>,
    ) -> Joined {
        let (reply, mut result) = oneshot::channel();
        let lead = {
            let mut state = self.state();
            // A hot stream: an append of this stream is queued or being written already, so
            // this one could only go in a later group, waiting a whole write (or more) to
            // learn what it would learn now: most likely that the other append changed the
            // stream. It is written alone at once, like an append without group commit, and
            // the unique index settles the race.
            if state.writing.contains_key(stream) || state.queue.iter().any(|r| r.stream == *stream)
            {
                return Joined::Alone(None);
            }
            state.queue.push(Request {
                stream: stream.clone(),
                expected: expected_code(expected),
                batch: batch.clone(),
                reply,
            });
            if state.slots < self.config.max_in_flight {
                state.slots += 1;
                // The newest spare connection, if a freed slot left one.
                Some(state.spare.pop().map(|(conn, _)| conn))
            } else {
                None
            }
        };
        if let Some(conn) = lead {
            Slot::new(Arc::clone(self), conn).lead(false).await;
        }
        loop {
            match tokio::time::timeout(STUCK_AFTER, &mut result).await {
                // A dropped reply (the leader was cancelled, maybe after sending the group's
                // statement): append alone; idempotency sorts out whether that statement
                // committed.
                Ok(joined) => return joined.unwrap_or(Joined::Unsettled),
                Err(_) => {
                    if let Some(slot) = self.extra_slot(batch) {
                        slot.lead(true).await;
                    }
                }
            }
        }
    }

    /// A slot beyond `max_in_flight` (at most `max_in_flight` more) for an append that is still
    /// queued after [`STUCK_AFTER`]: every write in flight has held its slot that long, maybe
    /// waiting on a lock held by a transaction whose owner is itself queued here.
    fn extra_slot(self: &Arc<Self>, batch: &Arc<Encoded>) -> Option<Slot> {
        let mut state = self.state();
        let queued = state.queue.iter().any(|r| Arc::ptr_eq(&r.batch, batch));
        if !queued || state.slots >= 2 * self.config.max_in_flight {
            return None;
        }
        state.slots += 1;
        tracing::debug!(
            slots = state.slots,
            queued = state.queue.len(),
            "group-commit writes in flight for {STUCK_AFTER:?}; leading the queue from an extra slot"
        );
        let conn = state.spare.pop().map(|(conn, _)| conn);
        Some(Slot::new(Arc::clone(self), conn))
    }

    /// Keeps a connection (a freed slot's, or one a load used) for the next slot taken or load,
    /// for `keep_connection`: at most [`GroupCommitter::spare_capacity`] of them, and only while
    /// the pool has another idle connection. A connection not kept comes back, for the caller to
    /// drop (back to the pool, to whoever may be waiting for it) once it has let go of the
    /// state's lock.
    #[must_use = "a connection not kept goes back to the pool when dropped: drop it outside the lock"]
    fn put_aside(
        self: &Arc<Self>,
        state: &mut State,
        conn: PoolConnection<Postgres>,
    ) -> Option<PoolConnection<Postgres>> {
        let keep = self.config.keep_connection;
        if keep.is_zero() || !self.may_hold() || state.spare.len() >= self.spare_capacity() {
            return Some(conn);
        }
        // Started with the first spare, and again if its runtime went away since.
        if state.reaper.as_ref().is_none_or(JoinHandle::is_finished) {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return Some(conn);
            };
            state.reaper = Some(runtime.spawn(reap(
                Arc::downgrade(self),
                Arc::clone(&self.spare_put),
                keep,
            )));
        }
        state.spare.push((conn, Instant::now()));
        self.spare_put.notify_one();
        None
    }

    /// The most connections kept aside at once: one per write slot, and [`KEPT_FOR_LOADS`] more
    /// for the loads of commands that run while the slots' connections are busy writing.
    fn spare_capacity(&self) -> usize {
        self.config.max_in_flight + KEPT_FOR_LOADS
    }

    /// Whether the committer may hold on to a connection now: only while the pool has another
    /// idle, so that it never sits on one that someone else is waiting for (another slot's
    /// leader, or the application, on a small pool).
    fn may_hold(&self) -> bool {
        self.pool.num_idle() > 0
    }

    /// A kept connection that is idle, for a load on the command path (the store's `read_stream`);
    /// hand it back with [`GroupCommitter::give_back`] once its result is read.
    pub(crate) fn borrow_kept(&self) -> Option<PoolConnection<Postgres>> {
        self.state().spare.pop().map(|(conn, _)| conn)
    }

    /// Puts a load's connection aside (after a read that succeeded), borrowed or from the pool.
    pub(crate) fn give_back(self: &Arc<Self>, conn: PoolConnection<Postgres>) {
        let rejected = self.put_aside(&mut self.state(), conn);
        drop(rejected);
    }

    /// Yields to the runtime, up to [`JOIN_YIELDS`] times and only while the queue keeps growing,
    /// so that tasks already runnable on it append before the group is taken. Under load those
    /// are mostly the callers of the group that just committed, woken by its replies and going on
    /// with their next command: without the yield, the first of them back finds a free slot and
    /// writes alone, and the rest wait for the next group. Only under load: a leader whose own
    /// append took a free slot while the last group took one append and nothing else is queued
    /// or in flight takes its group at once, so a lone client never yields (nor waits for a
    /// timer). `waited`: the leader leads appends that waited for a slot.
    async fn let_runnable_tasks_join(&self, waited: bool) {
        let queued = {
            let state = self.state();
            // A lone client (its append took a free slot, the last group was one append, nothing
            // else is queued or in flight): nothing is coming, and a yield would cost it a trip
            // through the scheduler (on a multi-threaded runtime, a wake-up of another worker).
            if !waited && state.last_group <= 1 && state.queue.len() <= 1 && state.slots <= 1 {
                return;
            }
            state.queue.len()
        };
        yield_while_growing(queued, || self.state().queue.len()).await;
    }

    /// Takes a group from the queue: the oldest appends, at most one per stream (a second
    /// append to a stream waits for a later group, keeping each stream's appends in order). The
    /// streams count as being written until the returned guard is dropped.
    fn take_group(self: &Arc<Self>) -> (Vec<Request>, Writing) {
        let mut state = self.state();
        let mut streams = HashSet::new();
        let mut group = Vec::new();
        let mut rest = Vec::new();
        for request in state.queue.drain(..) {
            if group.len() < self.config.max_batch && streams.insert(request.stream.clone()) {
                group.push(request);
            } else {
                rest.push(request);
            }
        }
        state.queue = rest;
        state.last_group = group.len();
        for request in &group {
            *state.writing.entry(request.stream.clone()).or_default() += 1;
        }
        let writing = Writing {
            committer: Arc::clone(self),
            streams: group.iter().map(|r| r.stream.clone()).collect(),
        };
        (group, writing)
    }
}

/// The streams of a group taken from the queue, counted in [`State::writing`] until the group's
/// write is done (dropped just before the replies go out, or with a cancelled write).
struct Writing {
    committer: Arc<GroupCommitter>,
    streams: Vec<StreamId>,
}

impl Drop for Writing {
    fn drop(&mut self) {
        let mut state = self.committer.state();
        for stream in &self.streams {
            if let Some(count) = state.writing.get_mut(stream) {
                *count -= 1;
                if *count == 0 {
                    state.writing.remove(stream);
                }
            }
        }
    }
}

/// One of the `max_in_flight` slots for writes. Dropped, it hands over: if appends are still
/// queued, a new leader is spawned for them (also when its holder was cancelled), else the slot is
/// freed.
///
/// A slot keeps the connection of its last successful write and hands it to the next leader, so
/// that under sustained load a slot's writes run back to back on one connection, without the
/// pool's round trips (sqlx pings a connection when it is taken and when it is given back). When
/// the queue is empty and the slot is freed, the connection is put aside for the next slot taken
/// (see [`GroupCommitter::put_aside`]).
pub(crate) struct Slot {
    committer: Arc<GroupCommitter>,
    conn: Option<PoolConnection<Postgres>>,
    /// The stream its holder writes alone (a group of one), counted as being written until the
    /// slot is dropped.
    writing: Option<Writing>,
}

impl Slot {
    fn new(committer: Arc<GroupCommitter>, conn: Option<PoolConnection<Postgres>>) -> Self {
        Self {
            committer,
            conn,
            writing: None,
        }
    }

    /// The connection the slot kept from its last write, if any. It skipped the pool's health
    /// check: a write that fails on it with a connection error retries on a pooled connection
    /// (appends are idempotent by event id).
    pub(crate) fn take_kept(&mut self) -> Option<PoolConnection<Postgres>> {
        self.conn.take()
    }

    /// Keeps `conn` for the next write of this slot (after a write that succeeded: a failed or
    /// cancelled one drops its connection, and sqlx checks it on its way back to the pool).
    pub(crate) fn keep(&mut self, conn: PoolConnection<Postgres>) {
        self.conn = Some(conn);
    }

    /// Leads the queue: lets appends join, takes its group and writes it. `queued`: the leader
    /// leads appends that waited for a slot (a slot handed over after a write, or an extra one),
    /// not its own caller's append on a free slot.
    async fn lead(mut self, queued: bool) {
        let committer = Arc::clone(&self.committer);
        if committer.config.max_wait.is_zero() {
            committer.let_runnable_tasks_join(queued).await;
        } else {
            tokio::time::sleep(committer.config.max_wait).await;
        }
        let (mut group, writing) = committer.take_group();
        if !group.is_empty() {
            cqrs_core::metrics::group_commit("postgres", group.len());
        }
        if group.len() > 1 {
            write_group(
                &mut self,
                &committer.sql,
                committer.announcer.get(),
                group,
                writing,
            )
            .await;
            return;
        }
        // Alone: the individual statement is cheaper than the group's. The slot goes with the
        // request, so its write counts as in flight; if its caller is gone, the reply (slot
        // included) drops here and the slot hands over.
        self.writing = Some(writing);
        if let Some(request) = group.pop() {
            let _ = request.reply.send(Joined::Alone(Some(self)));
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.committer.state();
        if state.queue.is_empty() {
            state.slots -= 1;
            let rejected = self
                .conn
                .take()
                .and_then(|conn| self.committer.put_aside(&mut state, conn));
            drop(state);
            drop(rejected);
            return;
        }
        // No runtime; or this drop runs inside the `spawn` below, which dropped its task at
        // once because the runtime is shutting down (spawning again would recurse until the
        // stack overflows). The queued replies drop, and their callers append alone.
        let runtime = tokio::runtime::Handle::try_current()
            .ok()
            .filter(|_| !HANDING_OVER.get());
        let Some(runtime) = runtime else {
            state.queue.clear();
            state.slots -= 1;
            return;
        };
        drop(state);
        // Appends are waiting: lead them from a task of its own, keeping this slot (and its
        // connection, if it may), so that this slot's holder gets on with its result now.
        let conn = self.conn.take().filter(|_| self.committer.may_hold());
        let next = Slot::new(Arc::clone(&self.committer), conn);
        HANDING_OVER.set(true);
        runtime.spawn(next.lead(true));
        HANDING_OVER.set(false);
    }
}

/// Yields to the runtime, up to [`JOIN_YIELDS`] times and only while `queued()` (a queue's
/// length, `queued` before the first yield) keeps growing: the tasks already runnable add to the
/// queue before a leader takes it. Not grown: nothing more is coming, or another leader took the
/// queue meanwhile.
pub(crate) async fn yield_while_growing(mut queued: usize, now: impl Fn() -> usize) {
    for _ in 0..JOIN_YIELDS {
        tokio::task::yield_now().await;
        let now = now();
        if now <= queued {
            break;
        }
        queued = now;
    }
}

thread_local! {
    /// Set while a dropped [`Slot`] spawns its successor on this thread.
    static HANDING_OVER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Gives spare connections back to the pool once they have been idle for `keep`: wakes when one is
/// put aside, then checks every `keep` until none is left. Ends with the committer.
async fn reap(committer: Weak<GroupCommitter>, spare_put: Arc<Notify>, keep: Duration) {
    loop {
        spare_put.notified().await;
        loop {
            tokio::time::sleep(keep).await;
            let Some(committer) = committer.upgrade() else {
                return;
            };
            let stale: Vec<_> = {
                let mut state = committer.state();
                let (stale, fresh) = std::mem::take(&mut state.spare)
                    .into_iter()
                    .partition(|(_, since)| since.elapsed() >= keep);
                state.spare = fresh;
                stale
            };
            // Dropped outside the lock: each goes back to the pool (sqlx checks it on the way).
            drop(stale);
            if committer.state().spare.is_empty() {
                break;
            }
        }
    }
}

/// One statement for the whole group, on the slot's connection; replies to every request. If
/// `announcer` gives it the interval's notification, the statement carries it.
///
/// The group's streams stop counting as being written (`writing` dropped) before the first reply
/// goes out: a member's caller may append to its stream again the moment it has its reply, and
/// that append belongs in the next group, not alone on the hot-stream path.
async fn write_group(
    slot: &mut Slot,
    sql: &Statements,
    announcer: Option<&Arc<Announcer>>,
    group: Vec<Request>,
    writing: Writing,
) {
    let events: usize = group.iter().map(|r| r.batch.len()).sum();
    let mut columns = Columns::with_capacity(events);
    for request in &group {
        columns.push(request);
    }
    let conn = match slot.take_kept() {
        Some(conn) => Ok(conn),
        None => slot.committer.pool.acquire().await,
    };
    let mut conn = match conn {
        Ok(conn) => conn,
        Err(error) => {
            // No connection: each caller appends alone (and meets the error itself).
            tracing::debug!(%error, appends = group.len(), "no connection for a group; appending individually");
            drop(writing);
            for request in group {
                let _ = request.reply.send(Joined::Alone(None));
            }
            return;
        }
    };
    let notifying = announcer.is_some_and(|announcer| announcer.claim());
    let statement = if notifying {
        &sql.append_many_notify
    } else {
        &sql.append_many
    };
    let last_id = columns.ids.last().copied();
    let mut collisions = 0;
    let result = loop {
        let mut query = sqlx::query(statement.clone())
            .bind(&columns.stream_type)
            .bind(&columns.stream_id)
            .bind(&columns.expected)
            .bind(&columns.offset)
            .bind(&columns.ids)
            .bind(&columns.types)
            .bind(&columns.schema_versions)
            .bind(&columns.payloads)
            .bind(&columns.metadata);
        if notifying {
            query = query.bind(last_id).bind(&sql.channel);
        }
        let result = query.fetch_all(&mut *conn).await;
        // A version collision means a concurrent transaction (another process, another slot, an
        // `append_in`) committed a version of one member's stream while the statement ran; the
        // statement wrote nothing. Run it again: that member's guard now sees the committed row
        // and refuses it alone, and the rest of the group is written, instead of every member
        // appending alone after a round trip. (A collision on an event id is a re-sent event: it
        // would collide again, so those members append alone, where retries are sorted out.)
        match &result {
            Err(error) if is_version_collision(error) && collisions < GROUP_COLLISION_RETRIES => {
                collisions += 1;
                tracing::debug!(%error, appends = group.len(), "group collided with a concurrent write; writing it again");
            }
            _ => break result,
        }
    };
    let replies: Vec<Joined> = match result {
        Ok(rows) => {
            if let (true, Some(announcer)) = (notifying, announcer) {
                if let Some(position) = notified(&rows) {
                    announcer.notified(position, "group");
                }
            }
            let landed = landed(&rows);
            let replies = group
                .iter()
                .map(|request| {
                    match landed.get(&(request.stream.stream_type(), request.stream.id())) {
                        // Refused: the statement committed without it.
                        None => Joined::Alone(None),
                        // Written, but its rows cannot be read back as its result.
                        Some(landed) => landed
                            .result(request.batch.len())
                            .map_or(Joined::Unsettled, Joined::Written),
                    }
                })
                .collect();
            tracing::trace!(appends = group.len(), events, "group committed");
            slot.keep(conn);
            replies
        }
        // Each caller appends alone, re-sending its own event ids: if the group did commit,
        // idempotency returns the original result, so every caller gets a definite answer.
        Err(error) => {
            tracing::debug!(%error, appends = group.len(), "group append failed; appending individually");
            // A lost connection may have lost the reply of a committed statement; any other
            // failure means nothing of the group was written (one statement, one transaction).
            let unsettled = connection_failed(&error);
            group
                .iter()
                .map(|_| {
                    if unsettled {
                        Joined::Unsettled
                    } else {
                        Joined::Alone(None)
                    }
                })
                .collect()
        }
    };
    drop(writing);
    for (request, reply) in group.into_iter().zip(replies) {
        let _ = request.reply.send(reply);
    }
}

/// What the group wrote to one stream: how many events, and the newest one's version, position
/// and transaction; `unreadable` if one of its rows could not be decoded.
#[derive(Default)]
struct Landed<'r> {
    events: usize,
    newest: Option<(i64, i64, &'r str)>,
    unreadable: bool,
}

impl Landed<'_> {
    /// The append's result if its whole batch of `n` events landed; `None` (the caller then
    /// appends alone and finds out) for a partial batch or an unreadable row.
    fn result(&self, n: usize) -> Option<AppendResult> {
        let (version, last, tx) = self.newest?;
        if self.unreadable || self.events != n {
            return None;
        }
        Some(AppendResult {
            stream_version: to_version(version),
            position: Position::new(parse_tx(tx).ok()?, u64::try_from(last).ok()?),
        })
    }
}

/// The position a notifying group's statement notified, if its last event was written.
fn notified(rows: &[sqlx::postgres::PgRow]) -> Option<Position> {
    rows.iter().find_map(|row| {
        let notified: Option<String> = row.try_get("notified").ok()?;
        notified?;
        let tx: &str = row.try_get(4).ok()?;
        let position: i64 = row.try_get(3).ok()?;
        Some(Position::new(
            parse_tx(tx).ok()?,
            u64::try_from(position).ok()?,
        ))
    })
}

/// The group's rows (one per written event; streams are distinct within a group) by stream, read
/// once. A refused batch wrote no rows, so its stream is absent.
fn landed(rows: &[sqlx::postgres::PgRow]) -> HashMap<(&str, &str), Landed<'_>> {
    let mut by_stream: HashMap<(&str, &str), Landed<'_>> = HashMap::new();
    for row in rows {
        let (Ok(stream_type), Ok(stream_id)) = (row.try_get(0), row.try_get(1)) else {
            // Without its stream the row cannot be attributed: no result can be trusted.
            by_stream.values_mut().for_each(|l| l.unreadable = true);
            return by_stream;
        };
        let entry = by_stream.entry((stream_type, stream_id)).or_default();
        entry.events += 1;
        match (row.try_get(2), row.try_get(3), row.try_get(4)) {
            (Ok(version), Ok(last), Ok(tx)) => {
                if entry.newest.is_none_or(|(v, ..)| version > v) {
                    entry.newest = Some((version, last, tx));
                }
            }
            _ => entry.unreadable = true,
        }
    }
    by_stream
}

/// The group flattened into the statement's parallel arrays, one entry per event.
struct Columns {
    stream_type: Vec<String>,
    stream_id: Vec<String>,
    expected: Vec<i64>,
    offset: Vec<i64>,
    ids: Vec<uuid::Uuid>,
    types: Vec<String>,
    schema_versions: Vec<i32>,
    payloads: Vec<String>,
    metadata: Vec<String>,
}

impl Columns {
    fn with_capacity(n: usize) -> Self {
        Self {
            stream_type: Vec::with_capacity(n),
            stream_id: Vec::with_capacity(n),
            expected: Vec::with_capacity(n),
            offset: Vec::with_capacity(n),
            ids: Vec::with_capacity(n),
            types: Vec::with_capacity(n),
            schema_versions: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
            metadata: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, request: &Request) {
        let batch = &request.batch;
        for (i, offset) in (0..batch.len()).zip(1_i64..) {
            self.stream_type
                .push(request.stream.stream_type().to_owned());
            self.stream_id.push(request.stream.id().to_owned());
            self.expected.push(request.expected);
            self.offset.push(offset);
            self.ids.push(batch.ids[i]);
            self.types.push(batch.types[i].clone());
            self.schema_versions.push(batch.schema_versions[i]);
            self.payloads.push(batch.payloads[i].clone());
            self.metadata.push(batch.metadata[i].clone());
        }
    }
}
