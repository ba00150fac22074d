//! The pool options `PostgresStore::connect` uses: a health check on checkout only where it can
//! find something.
//!
//! sqlx pings every connection it takes back (closing one that fails) and, by default, again
//! before handing it out: two round trips per operation that takes a connection from the pool,
//! the second one to check a connection that was checked moments ago. The check on checkout is
//! kept where it can find a dead connection: after the connection sat idle (the server or a
//! firewall may have closed it meanwhile), and for a moment after a store in the process saw any
//! connection fail (a server restart or a failover closes every connection at once, and a retry
//! must get a live one).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sqlx::postgres::PgPoolOptions;
use sqlx::Connection;

/// A connection idle for less than this was pinged when the pool took it back: handed out again
/// without another ping.
const PINGED_RECENTLY: Duration = Duration::from_millis(500);

/// For this long after a store in the process saw a connection fail, every connection of these
/// pools is pinged on checkout.
const SUSPECT_FOR: Duration = Duration::from_secs(2);

/// When a store in the process last saw a connection fail: milliseconds since [`epoch`], plus one (0: never).
static FAILED_AT: AtomicU64 = AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Notes that a connection failed: for [`SUSPECT_FOR`], every pool made from [`options`] pings
/// each connection before handing it out.
pub(crate) fn connection_failed() {
    FAILED_AT.store(now_ms().saturating_add(1), Ordering::Relaxed);
}

fn failed_recently() -> bool {
    match FAILED_AT.load(Ordering::Relaxed) {
        0 => false,
        at => now_ms().saturating_sub(at - 1) < SUSPECT_FOR.as_millis() as u64,
    }
}

pub(crate) fn options() -> PgPoolOptions {
    PgPoolOptions::new()
        .max_connections(10)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PINGED_RECENTLY || failed_recently() {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
}
