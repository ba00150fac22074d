//! SQLite backend for `cqrs-core`: the embedded, durable store. Events, snapshots, checkpoints
//! and projection read models in one file, no server.
//!
//! [`SqliteStore`] implements the storage traits ([`EventStore`], [`SnapshotStore`],
//! [`CheckpointStore`]), so a [`Repository`](cqrs_core::Repository) runs on it unchanged.
//! [`SqliteProjections`] runs projections whose read models are tables in the same file, each
//! batch committed with its checkpoint; [`SqliteStore::with_inline`] updates read models inside
//! the append itself. SQLite is compiled in (`sqlite-bundled`): nothing to install.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//!
//! use cqrs_core::prelude::*;
//! use cqrs_sqlite::{SqliteProjections, SqliteStore};
//! use serde::{Deserialize, Serialize};
//!
//! #[event(name = "MoneyDeposited")]
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! pub struct MoneyDeposited { pub amount: i64 }
//!
//! #[derive(Debug, Default, Aggregate)]
//! #[aggregate(name = "account", events(MoneyDeposited))]
//! pub struct Account { balance: i64 }
//!
//! impl Apply<MoneyDeposited> for Account {
//!     fn apply(&mut self, e: &MoneyDeposited) { self.balance += e.amount }
//! }
//!
//! pub struct Deposit { pub amount: i64 }
//!
//! impl Handle<Deposit> for Account {
//!     type Error = std::convert::Infallible;
//!     fn handle(&self, cmd: &Deposit) -> Result<Vec<AccountEvent>, Self::Error> {
//!         Ok(vec![MoneyDeposited { amount: cmd.amount }.into()])
//!     }
//! }
//!
//! /// Balances in table `balances` of the store's file.
//! #[derive(Debug, Default)]
//! pub struct Balances;
//!
//! #[projection(name = "balances")]
//! impl Balances {
//!     async fn deposited(
//!         &mut self,
//!         e: &MoneyDeposited,
//!         meta: &RecordedEvent,
//!         db: &mut sqlx::SqliteConnection,
//!     ) -> Result<(), sqlx::Error> {
//!         sqlx::query(
//!             "INSERT INTO balances (account, balance) VALUES (?1, ?2)
//!              ON CONFLICT (account) DO UPDATE SET balance = balance + excluded.balance",
//!         )
//!         .bind(meta.stream.id())
//!         .bind(e.amount)
//!         .execute(db)
//!         .await?;
//!         Ok(())
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let dir = std::env::temp_dir().join(format!("cqrs-sqlite-doc-{}", std::process::id()));
//!     std::fs::create_dir_all(&dir)?;
//!
//!     // Creates the file and its tables if needed; a second run continues where the first ended.
//!     let store = SqliteStore::open(dir.join("bank.db")).await?;
//!     sqlx::query("CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, balance INTEGER)")
//!         .execute(store.pool())
//!         .await?;
//!
//!     let accounts = Repository::<Account>::new(store.clone());
//!     let balances = ProjectionRunner::new(Balances, SqliteProjections::new(store.clone())).spawn();
//!
//!     let written = accounts.execute("acc-42", &Deposit { amount: 100 }).await?;
//!     let position = written.position.expect("the deposit wrote an event");
//!     balances.wait_for(position, Duration::from_secs(5)).await?;
//!     let balance: i64 = sqlx::query_scalar("SELECT balance FROM balances WHERE account = ?1")
//!         .bind("acc-42")
//!         .fetch_one(store.pool())
//!         .await?;
//!     assert_eq!(balance, 100);
//!
//!     balances.stop().await;
//!     store.close().await;
//!     std::fs::remove_dir_all(&dir)?;
//!     Ok(())
//! }
//! ```
//!
//! [`SqliteStore::open`] uses the defaults; [`SqliteStore::open_with`] takes a [`SqliteConfig`]
//! (durability, busy timeout, group size, read-only).
//!
//! # How it works
//!
//! - **Opening.** [`SqliteStore::open`] creates the file if it does not exist and applies the
//!   embedded migrations (`migrations/`, idempotent; an embedded store has no deploy step to run
//!   them separately). A file that is not an SQLite database, or one shorter than its own header
//!   says (truncated), is refused with [`SqliteError::NotADatabase`] before anything is written.
//! - **One writer at a time.** Every write transaction starts with `BEGIN IMMEDIATE`, taking
//!   SQLite's write lock before it reads (a lone single-event append is one `INSERT` statement in
//!   autocommit mode, which SQLite runs as a write transaction that takes the lock when it
//!   starts). So commit order is position order, and the log is
//!   gap-free by construction: `read_all` never has to wait for anything, and
//!   [`EventStore::committed_head`] is [`EventStore::head`].
//! - **Positions.** An event's position is its row's `INTEGER PRIMARY KEY AUTOINCREMENT` key
//!   `k`, as the core's `(tx, sequence)` pair `(k, k)`. AUTOINCREMENT never hands a key out
//!   twice.
//! - **Group commit.** The appends of a process are written on one connection, through one
//!   writer task. It commits everything queued (up to [`SqliteConfigBuilder::max_group`]) in one
//!   transaction, so one disk flush serves all of them, and each caller gets exactly its own
//!   result, conflict or error (an append with inline projections runs in a savepoint). An append
//!   alone, of one event and without inline projections, is a single statement with no `BEGIN`
//!   or `COMMIT` around it, which its caller runs itself when nothing is queued and the
//!   connection is idle.
//! - **Durability.** WAL mode, [`Synchronous::Full`] by default: an acknowledged append survives
//!   a power cut. [`Synchronous::Normal`] flushes only at checkpoints: a power cut or an OS crash
//!   may lose the last acknowledged commits (whole transactions, never part of one), a process
//!   crash loses nothing.
//! - **Several processes** may open the same file. Writes of other processes wait for the write
//!   lock up to [`SqliteConfigBuilder::busy_timeout`]; past it a write fails with
//!   [`SqliteError::Busy`] in [`StoreError::Connection`] (nothing written).
//! - **Idempotency and concurrency.** The expected version is checked in the `INSERT` itself,
//!   against the stream's version read in the same statement; the unique indexes on the event id
//!   and on `(stream_type, stream_id, stream_version)` are the backstop. A batch whose ids are stored is
//!   resolved by [`cqrs_core::backend::resolve_retry`], as on every backend.
//! - **Immutability.** Triggers refuse `UPDATE` and `DELETE` on the events table.
//! - **Wake-ups.** Projection runners wake at once on appends of their own process (a watch
//!   channel) and within [`SqliteConfigBuilder::poll_interval`] on commits of other processes
//!   (`PRAGMA data_version`).
//! - **Projections** ([`SqliteProjections`]) keep their read models in the same file and commit
//!   each batch with its checkpoint in one transaction: exactly once. One runner per projection
//!   across processes, by an OS file lock released when its process dies.
#![forbid(unsafe_code)]

mod admin;
mod append;
mod config;
mod error;
mod file;
mod lease;
mod notify;
mod projections;
mod row;
mod sql;
mod tx;
mod writer;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cqrs_core::backend::validate_types;
use cqrs_core::{
    AppendResult, CheckpointStore, EventId, EventStore, EventTypes, ExpectedVersion, NewEvent,
    Position, RecordedEvent, Snapshot, SnapshotStore, StoreError, StreamId, StreamVersion,
};
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection, SqlitePool, SqlitePoolOptions};
use sqlx::{ConnectOptions, Connection, Row};
use tokio::sync::{watch, Mutex};

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

pub use config::{
    ConfigError, SqliteConfig, SqliteConfigBuilder, Synchronous, DEFAULT_BUSY_TIMEOUT,
    DEFAULT_MAX_GROUP, DEFAULT_POLL_INTERVAL, DEFAULT_QUEUE_SIZE, DEFAULT_READ_CONNECTIONS,
};
pub use error::SqliteError;
pub use projections::SqliteProjections;

use crate::error::{to_i64, Errors};

/// The embedded migrations (`cqrs-sqlite/migrations/`), applied by [`SqliteStore::open`].
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How often opening retries the migrations when another process migrates the same new file at
/// the same moment (the loser's statements fail; its retry finds them applied).
const MIGRATION_ATTEMPTS: usize = 5;

/// The events, snapshots, checkpoints and read models of one SQLite file. Cheap to clone: clones
/// share the connections and the writer.
///
/// [`SqliteStore::open`] opens a file with the defaults; [`SqliteStore::open_with`] takes a
/// [`SqliteConfig`]. Either needs a Tokio runtime, which must keep running while the store is
/// used (the writer is a task on it).
///
/// ```no_run
/// use std::time::Duration;
/// use cqrs_sqlite::{SqliteConfig, SqliteStore, Synchronous};
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let config = SqliteConfig::builder("/var/lib/app/events.db")
///     .busy_timeout(Duration::from_secs(10)) // other processes writing to the same file
///     .synchronous(Synchronous::Full) // the default: an acknowledged append survives a power cut
///     .build()?;
/// let store = SqliteStore::open_with(config).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
    inline: cqrs_core::backend::InlineProjections<SqliteConnection>,
}

struct Shared {
    config: SqliteConfig,
    pool: SqlitePool,
    /// `None` when opened read-only.
    writer: Option<writer::Writer>,
    /// Every write transaction of this process holds it (see `tx`).
    gate: Arc<Mutex<()>>,
    errors: Errors,
    /// The key of the last event this process committed.
    appended: watch::Sender<i64>,
    watcher: notify::Watcher,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("config", &self.shared.config)
            .field("inline", &self.inline.names())
            .finish_non_exhaustive()
    }
}

impl SqliteStore {
    /// Opens (creating it if needed) the database file at `path` with the default configuration,
    /// and applies the embedded migrations.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, StoreError> {
        let config = SqliteConfig::builder(path)
            .build()
            .map_err(|e| StoreError::Backend(Box::new(e)))?;
        Self::open_with(config).await
    }

    /// Opens the file `config` names. Unless read-only: creates it if needed, switches it to WAL
    /// mode, applies the embedded migrations (idempotent, safe from several processes at once)
    /// and starts the writer on the current Tokio runtime (keep that runtime running while the
    /// store is used).
    pub async fn open_with(config: SqliteConfig) -> Result<Self, StoreError> {
        let errors = Errors {
            path: config.path.clone(),
            busy_timeout: config.busy_timeout,
        };
        file::check(&config.path).await?;
        let options = SqliteConnectOptions::new()
            .filename(&config.path)
            .create_if_missing(!config.read_only)
            .read_only(config.read_only)
            .busy_timeout(config.busy_timeout)
            .synchronous(config.synchronous.to_sqlx());
        // Boxed as `Send` here, where the lifetimes are concrete: the driver's connect and
        // migration futures are generic over lifetimes the compiler cannot otherwise prove
        // `Send` for, which would make `open` itself unspawnable.
        let connect: BoxFuture<'_, Result<SqliteConnection, sqlx::Error>> =
            Box::pin(options.connect());
        let mut setup = connect.await.map_err(|e| errors.map(e))?;
        let prepared: BoxFuture<'_, Result<(), StoreError>> = if config.read_only {
            Box::pin(expect_schema(&mut setup, &errors))
        } else {
            Box::pin(prepare(&mut setup, &errors, config.busy_timeout))
        };
        let prepared = prepared.await;
        let _ = setup.close().await;
        prepared?;
        let pool = SqlitePoolOptions::new()
            .max_connections(config.read_connections)
            .connect_with(options.clone())
            .await
            .map_err(|e| errors.map(e))?;
        let gate = Arc::new(Mutex::new(()));
        let (appended, _) = watch::channel(0);
        let writer = (!config.read_only).then(|| {
            writer::Writer::start(writer::WriterParts {
                options: options.clone(),
                errors: errors.clone(),
                gate: Arc::clone(&gate),
                appended: appended.clone(),
                queue_size: config.queue_size,
                max_group: config.max_group,
            })
        });
        Ok(Self {
            shared: Arc::new(Shared {
                watcher: notify::Watcher::new(options),
                config,
                pool,
                writer,
                gate,
                errors,
                appended,
            }),
            inline: cqrs_core::backend::InlineProjections::default(),
        })
    }

    /// Runs `projection` inside every append of this store (and its clones made afterwards): its
    /// handlers get the append's transaction (`type Context = sqlx::SqliteConnection`), so the
    /// events and the read-model rows commit together or not at all. A handler error fails the
    /// append with [`StoreError::InlineProjection`] and nothing of it is written (the other
    /// appends of its group are unaffected). An idempotent retry of stored events does not run
    /// it again.
    ///
    /// The value is cloned for each append and the clone dropped afterwards: keep the read
    /// model's state in the database. The handlers run on the writer, so every append of the
    /// process waits for them: keep them short, and use [`SqliteProjections`] for the rest. A
    /// handler must not append to the store itself (the writer would wait for itself).
    pub fn with_inline<P>(mut self, projection: P) -> Self
    where
        P: cqrs_core::Projection<Context = SqliteConnection> + Clone + Sync,
    {
        self.inline = self.inline.with(projection);
        self
    }

    /// The connection pool, for queries of read models. Write through a projection (or begin
    /// your own transactions with `BEGIN IMMEDIATE`).
    pub fn pool(&self) -> &SqlitePool {
        &self.shared.pool
    }

    /// The configuration the store was opened with.
    pub fn config(&self) -> &SqliteConfig {
        &self.shared.config
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.config.path
    }

    /// Closes the pooled connections (reads, checkpoints, snapshots, projection batches), which
    /// fail afterwards. The writer's own connection closes when the last clone of the store is
    /// dropped.
    pub async fn close(&self) {
        self.shared.pool.close().await;
    }

    /// [`CheckpointStore::load_checkpoint`] on the caller's connection (inside its transaction).
    pub async fn load_checkpoint_in(
        &self,
        conn: &mut SqliteConnection,
        name: &str,
    ) -> Result<Option<Position>, StoreError> {
        validate_checkpoint_name(name)?;
        let row = sqlx::query(sql::LOAD_CHECKPOINT)
            .bind(name)
            .fetch_optional(&mut *conn)
            .await
            .map_err(|e| self.fail(e))?;
        row.as_ref().map(checkpoint_position).transpose()
    }

    /// [`CheckpointStore::save_checkpoint`] (compare-and-set) on the caller's connection, so a
    /// projection commits its read-model writes and its checkpoint in one transaction. On
    /// [`StoreError::CheckpointConflict`] nothing changed; roll back and re-read.
    pub async fn save_checkpoint_in(
        &self,
        conn: &mut SqliteConnection,
        name: &str,
        expected: Option<Position>,
        new: Position,
    ) -> Result<(), StoreError> {
        validate_checkpoint_name(name)?;
        let now = row::now_micros();
        let done = match expected {
            None => {
                sqlx::query(sql::INSERT_CHECKPOINT)
                    .bind(name)
                    .bind(to_i64("position", new.tx)?)
                    .bind(to_i64("position", new.sequence)?)
                    .bind(now)
                    .execute(&mut *conn)
                    .await
            }
            Some(old) => {
                sqlx::query(sql::UPDATE_CHECKPOINT)
                    .bind(name)
                    .bind(to_i64("position", new.tx)?)
                    .bind(to_i64("position", new.sequence)?)
                    .bind(now)
                    .bind(to_i64("position", old.tx)?)
                    .bind(to_i64("position", old.sequence)?)
                    .execute(&mut *conn)
                    .await
            }
        }
        .map_err(|e| self.fail(e))?;
        if done.rows_affected() == 1 {
            return Ok(());
        }
        Err(StoreError::CheckpointConflict {
            name: name.to_owned(),
            expected,
            actual: self.load_checkpoint_in(conn, name).await?,
        })
    }

    fn fail(&self, error: sqlx::Error) -> StoreError {
        self.shared.errors.map(error)
    }

    /// A write transaction on a pooled connection, behind the process's write gate.
    async fn begin(&self) -> Result<tx::Tx, StoreError> {
        if self.shared.config.read_only {
            return Err(self.read_only());
        }
        tx::Tx::begin(&self.shared.pool, &self.shared.gate, &self.shared.errors).await
    }

    fn read_only(&self) -> StoreError {
        StoreError::Backend(Box::new(SqliteError::ReadOnly {
            path: self.shared.config.path.clone(),
            detail: "the store was opened read-only".into(),
        }))
    }

    async fn fetch_events(
        &self,
        query: sqlx::query::Query<'_, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = query
            .fetch_all(&self.shared.pool)
            .await
            .map_err(|e| self.fail(e))?;
        rows.iter().map(row::recorded).collect()
    }

    async fn count(
        &self,
        from_key: i64,
        to_key: i64,
        types: EventTypes<'_>,
    ) -> Result<u64, StoreError> {
        validate_types(types)?;
        let query = match types {
            EventTypes::All => sqlx::query_scalar(sql::COUNT).bind(from_key).bind(to_key),
            EventTypes::Only(names) => sqlx::query_scalar(sql::COUNT_FILTERED)
                .bind(from_key)
                .bind(to_key)
                .bind(types_json(names)),
        };
        let count: i64 = query
            .fetch_one(&self.shared.pool)
            .await
            .map_err(|e| self.fail(e))?;
        Ok(u64::try_from(count).unwrap_or_default())
    }
}

/// Switches a new or existing file to WAL mode and applies the migrations.
async fn prepare(
    conn: &mut SqliteConnection,
    errors: &Errors,
    busy_timeout: Duration,
) -> Result<(), StoreError> {
    // Switching to WAL takes an exclusive lock the busy timeout does not wait for; another
    // process opening the same new file at the same moment holds it briefly.
    let started = Instant::now();
    loop {
        match sqlx::query_scalar::<_, String>("PRAGMA journal_mode = WAL")
            .fetch_one(&mut *conn)
            .await
        {
            Ok(mode) if mode.eq_ignore_ascii_case("wal") => break,
            Ok(mode) => {
                return Err(StoreError::Backend(
                    format!("SQLite refused WAL mode (journal mode is `{mode}`)").into(),
                ))
            }
            Err(error) => match errors.map(error) {
                StoreError::Connection(_) if started.elapsed() < busy_timeout => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => return Err(other),
            },
        }
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        // `run` with `skip = false`, on the connection itself: `Migrator::run` takes an
        // `Acquire` whose future the compiler cannot prove `Send`, which would make `open`
        // unspawnable (sqlx exposes this entry point for that reason).
        match MIGRATOR.run_direct(None, &mut *conn, false).await {
            Ok(()) => return Ok(()),
            Err(_) if attempt < MIGRATION_ATTEMPTS => {
                tokio::time::sleep(Duration::from_millis(20 * attempt as u64)).await;
            }
            Err(sqlx::migrate::MigrateError::Execute(error)) => return Err(errors.map(error)),
            Err(other) => return Err(StoreError::Backend(Box::new(other))),
        }
    }
}

/// For a read-only store: the file must already hold the event store.
async fn expect_schema(conn: &mut SqliteConnection, errors: &Errors) -> Result<(), StoreError> {
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sqlite_schema WHERE type = 'table' AND name IN ('events', 'checkpoints', 'snapshots')",
    )
    .fetch_one(&mut *conn)
    .await
    .map_err(|e| errors.map(e))?;
    if tables == 3 {
        return Ok(());
    }
    Err(StoreError::Backend(Box::new(SqliteError::NotADatabase {
        path: errors.path.clone(),
        detail: "it holds no event store (open it writable once to create one)".into(),
    })))
}

fn types_json(names: &[&str]) -> String {
    serde_json::Value::from(names.to_vec()).to_string()
}

/// Longest checkpoint name accepted, in bytes; also the limit for the consumer names of
/// [`SqliteProjections::first_delivery`].
pub use cqrs_core::checkpoint::MAX_CHECKPOINT_NAME_LEN;

fn validate_checkpoint_name(name: &str) -> Result<(), StoreError> {
    validate_key_name("checkpoint name", name)
}

/// The core's rule for checkpoint names, for every name stored as a key (checkpoints,
/// first-delivery consumers).
fn validate_key_name(what: &'static str, name: &str) -> Result<(), StoreError> {
    cqrs_core::backend::validate_checkpoint_name(name).map_err(|mut invalid| {
        invalid.what = what;
        StoreError::InvalidId(invalid)
    })
}

fn checkpoint_position(row: &sqlx::sqlite::SqliteRow) -> Result<Position, StoreError> {
    let part = |index: usize| -> Result<u64, StoreError> {
        let value: i64 = row
            .try_get(index)
            .map_err(|e| StoreError::Backend(Box::new(e)))?;
        u64::try_from(value)
            .map_err(|_| StoreError::Backend(format!("negative checkpoint {value}").into()))
    };
    Ok(Position::new(part(0)?, part(1)?))
}

#[async_trait]
impl EventStore for SqliteStore {
    async fn append(
        &self,
        stream: &StreamId,
        expected: ExpectedVersion,
        events: Vec<NewEvent>,
    ) -> Result<AppendResult, StoreError> {
        let batch = append::encode(stream, &events)?;
        let Some(writer) = &self.shared.writer else {
            return Err(self.read_only());
        };
        writer
            .append(stream, expected, events, batch, self.inline.clone())
            .await
    }

    async fn read_stream(
        &self,
        stream: &StreamId,
        from: StreamVersion,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        stream.validate()?;
        let query = sqlx::query(sql::READ_STREAM)
            .bind(stream.stream_type())
            .bind(stream.id())
            .bind(i64::try_from(from.get()).unwrap_or(i64::MAX))
            .bind(i64::try_from(limit).unwrap_or(i64::MAX));
        self.fetch_events(query).await
    }

    async fn find_event(&self, id: EventId) -> Result<Option<RecordedEvent>, StoreError> {
        let query = sqlx::query(sql::FIND_EVENT).bind(id.as_uuid().as_bytes().as_slice());
        Ok(self.fetch_events(query).await?.into_iter().next())
    }

    async fn read_all(
        &self,
        after: Position,
        types: EventTypes<'_>,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        validate_types(types)?;
        let from = row::first_key_after(after);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let query = match types {
            EventTypes::All => sqlx::query(sql::READ_ALL).bind(from).bind(limit),
            EventTypes::Only(names) => sqlx::query(sql::READ_ALL_FILTERED)
                .bind(from)
                .bind(limit)
                .bind(types_json(names)),
        };
        self.fetch_events(query).await
    }

    async fn stream_version(&self, stream: &StreamId) -> Result<StreamVersion, StoreError> {
        stream.validate()?;
        let mut conn = self.shared.pool.acquire().await.map_err(|e| self.fail(e))?;
        append::stream_version(&mut conn, &self.shared.errors, stream).await
    }

    async fn head(&self) -> Result<Option<Position>, StoreError> {
        let key: Option<i64> = sqlx::query_scalar(sql::HEAD)
            .fetch_one(&self.shared.pool)
            .await
            .map_err(|e| self.fail(e))?;
        key.map(row::position_of).transpose()
    }

    async fn count_after(&self, after: Position, types: EventTypes<'_>) -> Result<u64, StoreError> {
        self.count(row::first_key_after(after), i64::MAX, types)
            .await
    }

    async fn count_between(
        &self,
        after: Position,
        until: Position,
        types: EventTypes<'_>,
    ) -> Result<u64, StoreError> {
        self.count(
            row::first_key_after(after),
            row::last_key_until(until),
            types,
        )
        .await
    }

    /// Wakes at once on appends of this process; within the poll interval on commits of
    /// other processes.
    async fn wait_for_append(&self, after: Position, timeout: Duration) {
        let threshold = row::first_key_after(after);
        let mut appended = self.shared.appended.subscribe();
        let deadline = Instant::now() + timeout;
        let watcher = &self.shared.watcher;
        let mut seen = watcher.generation().await;
        // The head is looked at after the first poll whatever it says: another process may
        // have committed between the caller's last read and this call.
        let mut look = true;
        loop {
            if *appended.borrow_and_update() >= threshold {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            let tick = self.shared.config.poll_interval.min(deadline - now);
            tokio::select! {
                changed = appended.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(deadline - now).await;
                        return;
                    }
                    continue;
                }
                () = tokio::time::sleep(tick) => {}
            }
            let generation = watcher.poll().await;
            if generation != seen || look {
                seen = generation;
                look = false;
                if let Ok(Some(head)) = self.head().await {
                    if head > after {
                        return;
                    }
                }
            }
        }
    }
}

#[async_trait]
impl SnapshotStore for SqliteStore {
    async fn load_snapshot(&self, stream: &StreamId) -> Result<Option<Snapshot>, StoreError> {
        stream.validate()?;
        let row = sqlx::query(sql::LOAD_SNAPSHOT)
            .bind(stream.stream_type())
            .bind(stream.id())
            .fetch_optional(&self.shared.pool)
            .await
            .map_err(|e| self.fail(e))?;
        let Some(row) = row else { return Ok(None) };
        let version: Result<i64, _> = row.try_get(0);
        let snapshot_version: Result<i64, _> = row.try_get(1);
        let payload: Result<String, _> = row.try_get(2);
        // An unreadable snapshot is no snapshot: the repository replays the stream.
        let (Ok(Ok(version)), Ok(Ok(snapshot_version)), Ok(Ok(payload))) = (
            version.map(u64::try_from),
            snapshot_version.map(u32::try_from),
            payload.map(|p| serde_json::from_str(&p)),
        ) else {
            tracing::warn!(%stream, "ignoring an unreadable snapshot");
            return Ok(None);
        };
        Ok(Some(Snapshot {
            stream: stream.clone(),
            stream_version: StreamVersion::new(version),
            snapshot_version,
            payload,
        }))
    }

    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<(), StoreError> {
        cqrs_core::backend::validate_snapshot(&snapshot)?;
        let version = to_i64("stream version", snapshot.stream_version.get())?;
        let mut tx = self.begin().await?;
        sqlx::query(sql::SAVE_SNAPSHOT)
            .bind(snapshot.stream.stream_type())
            .bind(snapshot.stream.id())
            .bind(version)
            .bind(i64::from(snapshot.snapshot_version))
            .bind(snapshot.payload.to_string())
            .bind(row::now_micros())
            .execute(tx.conn())
            .await
            .map_err(|e| self.fail(e))?;
        tx.commit().await
    }
}

#[async_trait]
impl CheckpointStore for SqliteStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<Position>, StoreError> {
        validate_checkpoint_name(name)?;
        let mut conn = self.shared.pool.acquire().await.map_err(|e| self.fail(e))?;
        self.load_checkpoint_in(&mut conn, name).await
    }

    async fn save_checkpoint(
        &self,
        name: &str,
        expected: Option<Position>,
        new: Position,
    ) -> Result<(), StoreError> {
        validate_checkpoint_name(name)?;
        let mut tx = self.begin().await?;
        match self
            .save_checkpoint_in(tx.conn(), name, expected, new)
            .await
        {
            Ok(()) => tx.commit().await,
            Err(error) => {
                let _ = tx.rollback().await;
                Err(error)
            }
        }
    }

    async fn delete_checkpoint(&self, name: &str) -> Result<(), StoreError> {
        validate_checkpoint_name(name)?;
        let mut tx = self.begin().await?;
        sqlx::query(sql::DELETE_CHECKPOINT)
            .bind(name)
            .execute(tx.conn())
            .await
            .map_err(|e| self.fail(e))?;
        tx.commit().await
    }
}
