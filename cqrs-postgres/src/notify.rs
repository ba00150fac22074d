//! `LISTEN/NOTIFY` on `<schema>_events`, with the position of the last appended event as payload.
//!
//! Appends do not all notify: PostgreSQL serializes the commits of every notifying transaction on
//! one lock, so notifying from every append would serialize concurrent commits (BENCHMARKS.md has
//! the measurement). The [`Announcer`] lets at most one append (or group commit) per
//! [`ANNOUNCE_INTERVAL`] notify in its own statement, carrying its position; appends that commit
//! meanwhile are covered by the next one, and after the last append of a burst a background
//! `NOTIFY` covers the rest. Waiters in the appending process are woken directly. `append_in`
//! always notifies in its statement: only PostgreSQL sees the caller's commit.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cqrs_core::{Position, StoreError};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::error::map_error;
use crate::sql::Statements;

/// Notifications of committed appends on one store's channel; from [`crate::PostgresStore::listen`].
///
/// Notifications are a wake-up signal, not a delivery mechanism: read the events with
/// [`cqrs_core::EventStore::read_all`] (they become readable once the visibility horizon passes
/// them, see the crate docs).
pub struct AppendListener {
    listener: PgListener,
}

impl std::fmt::Debug for AppendListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppendListener").finish_non_exhaustive()
    }
}

impl AppendListener {
    pub(crate) async fn new(pool: &PgPool, channel: &str) -> Result<Self, StoreError> {
        let mut listener = PgListener::connect_with(pool).await.map_err(map_error)?;
        listener.listen(channel).await.map_err(map_error)?;
        Ok(Self { listener })
    }

    /// Waits for the next notification. `Some(position)`: an append committed, its last event at
    /// `position` (with group commit, the last event of the whole group); a hint only, since any
    /// role that can connect may notify on the channel with any position. `None`: the connection
    /// was lost and has been re-established, and notifications sent meanwhile are lost: re-read
    /// from your checkpoint.
    pub async fn recv(&mut self) -> Result<Option<Position>, StoreError> {
        loop {
            match self.listener.try_recv().await.map_err(map_error)? {
                Some(notification) => {
                    // Not a position: someone else's notification on this channel; not ours.
                    if let Ok(position) = notification.payload().parse() {
                        return Ok(Some(position));
                    }
                }
                None => return Ok(None),
            }
        }
    }
}

/// The latest notification, shared by every clone of a store, fed by one background listener task
/// on its own connection (started on first use by `wait_for_append`).
///
/// A notification is a hint, never state: any role that can connect may `NOTIFY` on the channel,
/// with any payload. So every notification wakes every waiter (a real one after a bogus, higher
/// position must still wake them), and a position it carries counts only for [`HINT_FRESH`]:
/// nothing a notification says outlives the next real one, or that interval.
pub(crate) struct Notifier {
    sender: Arc<watch::Sender<Option<Hint>>>,
    latest: watch::Receiver<Option<Hint>>,
    task: JoinHandle<()>,
}

/// A notification: the position it names, and when it arrived.
#[derive(Debug, Clone, Copy)]
struct Hint {
    position: Position,
    at: Instant,
}

/// How long a notified position past a waiter's `after` makes `wait` return at once (the waiter
/// may have been reading when it arrived, and missed it). A runner polls after its interval
/// anyway (one second by default), so an older hint would add nothing but the chance for a
/// bogus one to keep every waiter spinning.
const HINT_FRESH: Duration = Duration::from_secs(1);

impl Drop for Notifier {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Notifier {
    pub(crate) fn start(pool: &PgPool, channel: String) -> Arc<Self> {
        let (sender, latest) = watch::channel(None);
        let sender = Arc::new(sender);
        // Its own single connection, so the listener never takes one from the caller's pool.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(pool.connect_options().as_ref().clone());
        let task = tokio::spawn(listen_forever(pool, channel, Arc::clone(&sender)));
        Arc::new(Self {
            sender,
            latest,
            task,
        })
    }

    /// An append by this process committed up to `position`: wakes local waiters at once,
    /// without the round trip through the database.
    pub(crate) fn appended(&self, position: Position) {
        hint(&self.sender, position);
    }

    /// Resolves when an append after `after` may have committed, or after `timeout`.
    pub(crate) async fn wait(&self, after: Position, timeout: Duration) {
        let mut latest = self.latest.clone();
        let fresh = latest
            .borrow_and_update()
            .is_some_and(|hint| hint.position > after && hint.at.elapsed() < HINT_FRESH);
        if fresh {
            // Notified just now, maybe while the caller was reading. Pause briefly: the event
            // may still be above the visibility horizon, and an immediate return would spin.
            tokio::time::sleep(timeout.min(Duration::from_millis(5))).await;
            return;
        }
        let _ = tokio::time::timeout(timeout, latest.changed()).await;
    }
}

/// Records a notification of `position` (whatever the previous one said) and wakes every waiter.
fn hint(latest: &watch::Sender<Option<Hint>>, position: Position) {
    latest.send_replace(Some(Hint {
        position,
        at: Instant::now(),
    }));
}

async fn listen_forever(pool: PgPool, channel: String, sender: Arc<watch::Sender<Option<Hint>>>) {
    loop {
        match AppendListener::new(&pool, &channel).await {
            Ok(mut listener) => loop {
                match listener.recv().await {
                    Ok(Some(position)) => hint(&sender, position),
                    // Reconnected: something may have been missed; wake every waiter.
                    Ok(None) => sender.send_modify(|_| {}),
                    Err(error) => {
                        tracing::debug!(%error, "append listener lost its connection");
                        sender.send_modify(|_| {});
                        break;
                    }
                }
            },
            Err(error) => tracing::debug!(%error, "append listener cannot connect"),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Announces this process's committed appends, at most one notification per
/// [`ANNOUNCE_INTERVAL`]: started on the first append, stopped when the last store clone is
/// dropped.
///
/// Under steady load the notification rides on an append: the first append (or group commit) of
/// each interval [claims](Announcer::claim) it and runs the statement variant that calls
/// `pg_notify` itself, so announcing costs no extra round trip and no extra commit, and only one
/// commit per interval takes PostgreSQL's notification lock. Appends that commit later in the
/// interval are covered by the next claim; when the appends stop, the background task sends one
/// trailing `NOTIFY` for what no append announced.
pub(crate) struct Announcer {
    latest: watch::Sender<Position>,
    state: Arc<Mutex<Announced>>,
    task: JoinHandle<()>,
}

/// What has been announced.
#[derive(Debug, Default)]
struct Announced {
    /// When the last notification was claimed or sent.
    at: Option<Instant>,
    /// The newest position a committed notification covers.
    covered: Position,
}

/// What the background task does about the appends committed up to `latest`.
#[derive(Debug, PartialEq, Eq)]
enum Step {
    /// A committed notification covers them.
    Covered,
    /// A notification went out less than an interval ago: wait this long, then look again.
    Wait(Duration),
    /// Send one now (recorded as sent, covering `latest`).
    Send,
}

impl Announced {
    fn next_step(&mut self, latest: Position, now: Instant) -> Step {
        if latest <= self.covered {
            return Step::Covered;
        }
        // Two intervals, not one: under steady load the next interval's first append claims
        // the notification (no extra round trip) a moment after one interval, and a timer that
        // fired at one interval would race it and mostly win. Only the end of a burst waits
        // that long.
        let since = self.at.map(|at| now.saturating_duration_since(at));
        match since {
            Some(since) if since < TRAILING_AFTER => Step::Wait(TRAILING_AFTER - since),
            _ => {
                self.at = Some(now);
                self.covered = latest;
                Step::Send
            }
        }
    }
}

impl Drop for Announcer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Announcer {
    pub(crate) fn start(pool: &PgPool, sql: Arc<Statements>) -> Arc<Self> {
        let (latest, pending) = watch::channel(Position::START);
        let state = Arc::new(Mutex::new(Announced::default()));
        let task = tokio::spawn(announce_forever(
            pool.clone(),
            sql,
            pending,
            Arc::clone(&state),
        ));
        Arc::new(Self {
            latest,
            state,
            task,
        })
    }

    /// `true`: no notification went out within the interval, and the caller's append should
    /// notify in its own statement (then report it with [`Announcer::notified`]).
    pub(crate) fn claim(&self) -> bool {
        let mut state = lock(&self.state);
        let due = state.at.is_none_or(|at| at.elapsed() >= ANNOUNCE_INTERVAL);
        if due {
            state.at = Some(Instant::now());
        }
        due
    }

    /// An append (`carried_by` `append`) or a group (`group`) that notified in its statement
    /// committed with its last event at `position`.
    pub(crate) fn notified(&self, position: Position, carried_by: &'static str) {
        {
            let mut state = lock(&self.state);
            state.covered = state.covered.max(position);
        }
        cqrs_core::metrics::notification("postgres", carried_by);
    }

    /// An append committed with its last event at `position`.
    pub(crate) fn announce(&self, position: Position) {
        advance(&self.latest, position);
    }
}

/// Moves `latest` forward to `position` (never back), waking its receivers.
fn advance(latest: &watch::Sender<Position>, position: Position) {
    latest.send_if_modified(|latest| {
        let newer = position > *latest;
        if newer {
            *latest = position;
        }
        newer
    });
}

fn lock(state: &Mutex<Announced>) -> std::sync::MutexGuard<'_, Announced> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// At most one announcement per interval: appends within an interval share one notification, at
/// the cost of up to this much extra latency (twice this for the last appends of a burst) for
/// listeners in other processes. Local waiters are woken directly.
const ANNOUNCE_INTERVAL: Duration = Duration::from_millis(2);

/// How long after the last notification the background task sends one for appends no later
/// append announced: the end of a burst.
const TRAILING_AFTER: Duration = ANNOUNCE_INTERVAL.saturating_mul(2);

/// Sends the notifications no append carried: whenever committed appends are not covered and no
/// notification went out for [`TRAILING_AFTER`].
async fn announce_forever(
    pool: PgPool,
    sql: Arc<Statements>,
    mut pending: watch::Receiver<Position>,
    state: Arc<Mutex<Announced>>,
) {
    while pending.changed().await.is_ok() {
        loop {
            let latest = *pending.borrow_and_update();
            let step = lock(&state).next_step(latest, Instant::now());
            match step {
                Step::Covered => break,
                // A notification went out (or is on its way in an append) within the interval:
                // give the appends of this interval the chance to be covered by the next one.
                Step::Wait(wait) => {
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Step::Send => {}
            }
            // A lost notification only delays listeners until their polling fallback.
            match sqlx::query(sql.notify.clone())
                .bind(&sql.channel)
                .bind(latest.to_string())
                .execute(&pool)
                .await
            {
                Ok(_) => cqrs_core::metrics::notification("postgres", "background"),
                Err(error) => tracing::debug!(%error, "announcing an append failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_background_task_sends_only_what_no_append_announced_once_per_interval() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let (one, two, three) = (
            Position::new(5, 1),
            Position::new(6, 2),
            Position::new(7, 3),
        );
        let mut state = Announced::default();
        // Nothing announced yet: send at once.
        assert_eq!(state.next_step(one, at(0)), Step::Send);
        assert_eq!(state.next_step(one, at(0)), Step::Covered);
        // An append committed after it, within the interval: wait until two intervals have
        // passed (an append of the next interval may claim the notification meanwhile) ...
        assert_eq!(
            state.next_step(two, at(1)),
            Step::Wait(Duration::from_millis(3))
        );
        assert_eq!(
            state.next_step(two, at(2)),
            Step::Wait(Duration::from_millis(2))
        );
        // ... and if none did, send then: the last append of a burst is announced.
        assert_eq!(state.next_step(two, at(4)), Step::Send);
        assert_eq!(state.next_step(two, at(9)), Step::Covered);
        // An append that notified in its own statement covers itself and what came before.
        state.at = Some(at(10));
        state.covered = three;
        assert_eq!(state.next_step(three, at(11)), Step::Covered);
    }
}
