//! Wake-ups: appends of this process through a watch channel, commits of other processes by
//! polling `PRAGMA data_version`, which changes whenever another connection commits to the file.

use std::time::Duration;

use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::ConnectOptions;
use tokio::sync::Mutex;

use crate::sql;

/// One connection that watches the file for commits by other connections, shared by every
/// waiting runner of the store.
#[derive(Debug)]
pub(crate) struct Watcher {
    options: SqliteConnectOptions,
    state: Mutex<WatchState>,
}

#[derive(Debug, Default)]
struct WatchState {
    conn: Option<SqliteConnection>,
    data_version: Option<i64>,
    /// How many changes the watcher has seen: each waiter compares it with the value it saw
    /// last, so a change one waiter observed is not lost to the others.
    generation: u64,
}

/// How long a poll may take before it counts as a change (then the caller looks at the head).
const POLL_TIMEOUT: Duration = Duration::from_secs(2);

impl Watcher {
    pub(crate) fn new(options: SqliteConnectOptions) -> Self {
        Self {
            options,
            state: Mutex::default(),
        }
    }

    /// The current generation, after looking at `data_version` once.
    pub(crate) async fn poll(&self) -> u64 {
        let mut state = self.state.lock().await;
        let polled = tokio::time::timeout(POLL_TIMEOUT, async {
            if state.conn.is_none() {
                state.conn = self.options.connect().await.ok();
            }
            let conn = state.conn.as_mut()?;
            sqlx::query_scalar::<_, i64>(sql::DATA_VERSION)
                .fetch_one(conn)
                .await
                .ok()
        })
        .await
        .ok()
        .flatten();
        match polled {
            Some(version) if state.data_version == Some(version) => {}
            Some(version) => {
                state.data_version = Some(version);
                state.generation += 1;
            }
            None => {
                // Unknown: reconnect next time, and let the caller look at the head.
                state.conn = None;
                state.data_version = None;
                state.generation += 1;
            }
        }
        state.generation
    }

    /// The generation without polling.
    pub(crate) async fn generation(&self) -> u64 {
        self.state.lock().await.generation
    }
}
