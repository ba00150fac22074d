//! cqrs-sqlite side by side with raw sqlx on SQLite and (with `--features peers`) cqrs-es 0.5 +
//! sqlite-es 0.5: W1, batch append, catch-up and (in `memory`) the peak memory of loading one long
//! stream. Every contender gets a fresh file of its own in `std::env::temp_dir()` (one file
//! system for all), WAL mode and `synchronous = FULL` (every commit flushed before it returns).

use std::collections::HashMap;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cqrs_core::store::read_all_batched;
use cqrs_core::subscription::{InProcess, ProjectionRunner, RunnerConfig};
use cqrs_core::{
    EventStore, EventTypes, ExpectedVersion, Position, Projection, ProjectionError, RecordedEvent,
    Repository, StreamId, StreamVersion,
};
use cqrs_sqlite::{SqliteConfig, SqliteProjections, SqliteStore, Synchronous};
use futures_util::TryStreamExt;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use tokio::task::JoinSet;

use crate::append::{workload, Batch, BATCH};
use crate::domain::{deposits, opened, Account, Cmd, MoneyDeposited};
use crate::report::{median, rate, ratio, Table};
use crate::w1::{interleave, micros, Contender, Interleaved};
use crate::{db, BenchError, Config};

/// Connections of every contender's pool (ours: read connections, beside its writer's own).
const CONNECTIONS: u32 = db::POOL_SIZE;

/// A fresh path `<temp dir>/cqrs-bench-<pid>/<name>.db` (the directory is created, an old file of
/// that name removed).
pub fn temp_db(name: &str) -> Result<PathBuf, BenchError> {
    let dir = std::env::temp_dir().join(format!("cqrs-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}.db"));
    remove_db(&path);
    Ok(path)
}

/// Removes an SQLite file and its WAL and shared-memory files (what exists of them).
pub fn remove_db(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
}

/// Ours: a store on `path`, WAL and `synchronous = FULL` (the defaults, spelled out).
pub async fn our_store(path: &Path) -> Result<SqliteStore, BenchError> {
    let config = SqliteConfig::builder(path)
        .synchronous(Synchronous::Full)
        .read_connections(CONNECTIONS)
        .build()?;
    Ok(SqliteStore::open_with(config).await?)
}

/// The raw contenders' connection options: `path` (created if missing), WAL, `synchronous`, and
/// sqlx's busy handler for concurrent writers.
pub fn raw_options(path: &Path, synchronous: SqliteSynchronous) -> SqliteConnectOptions {
    SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(synchronous)
        .busy_timeout(Duration::from_secs(30))
}

/// A raw sqlx pool on `path` ([`raw_options`], `synchronous = FULL`), every connection opened
/// before it is returned.
pub async fn raw_pool(path: &Path) -> Result<SqlitePool, BenchError> {
    let options = raw_options(path, SqliteSynchronous::Full);
    let pool = SqlitePoolOptions::new()
        .max_connections(CONNECTIONS)
        .connect_with(options)
        .await?;
    let mut held = Vec::new();
    for _ in 0..CONNECTIONS {
        held.push(pool.acquire().await?);
    }
    drop(held);
    Ok(pool)
}

async fn count_events(pool: &SqlitePool) -> Result<i64, BenchError> {
    Ok(sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await?)
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

// ---------------------------------------------------------------------------------------------
// W1

/// Ours: `Repository<Account>` over `SqliteStore` (group commit is the store's writer: always on).
pub struct OursSqlite {
    repo: Repository<Account>,
    store: SqliteStore,
    path: PathBuf,
}

impl OursSqlite {
    async fn new(name: &str, cache: bool) -> Result<Self, BenchError> {
        let path = temp_db(name)?;
        let store = our_store(&path).await?;
        let mut repo = Repository::new(store.clone());
        if !cache {
            repo = repo.without_cache();
        }
        Ok(Self { repo, store, path })
    }
}

impl Contender for OursSqlite {
    async fn execute(&self, id: &str, cmd: &Cmd) -> Result<(), BenchError> {
        self.repo.execute(id, cmd).await?;
        Ok(())
    }

    async fn stored_events(&self) -> Result<i64, BenchError> {
        count_events(self.store.pool()).await
    }

    async fn finish(self) -> Result<(), BenchError> {
        drop(self.repo);
        self.store.close().await;
        drop(self.store);
        remove_db(&self.path);
        Ok(())
    }
}

/// The least raw code for W1 on SQLite: read the stream, fold it, decide, one `INSERT`
/// (autocommit) into a minimal table whose unique `(stream_type, stream_id, stream_version)`
/// rejects a concurrent writer.
pub struct RawSqlite {
    pool: SqlitePool,
    path: PathBuf,
}

const RAW_TABLE: &str = "CREATE TABLE events (
    position       INTEGER PRIMARY KEY,
    stream_type    TEXT    NOT NULL,
    stream_id      TEXT    NOT NULL,
    stream_version INTEGER NOT NULL,
    event_id       BLOB    NOT NULL,
    event_type     TEXT    NOT NULL,
    schema_version INTEGER NOT NULL,
    payload        TEXT    NOT NULL,
    metadata       TEXT    NOT NULL,
    recorded_at    INTEGER NOT NULL,
    UNIQUE (stream_type, stream_id, stream_version)
)";

const RAW_SELECT: &str = "SELECT stream_version, event_type, payload FROM events
    WHERE stream_type = ?1 AND stream_id = ?2 ORDER BY stream_version";

const RAW_INSERT: &str = "INSERT INTO events (stream_type, stream_id, stream_version, event_id,
    event_type, schema_version, payload, metadata, recorded_at)
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, '{}', ?8)";

impl RawSqlite {
    async fn new(name: &str) -> Result<Self, BenchError> {
        let path = temp_db(name)?;
        let pool = raw_pool(&path).await?;
        sqlx::query(RAW_TABLE).execute(&pool).await?;
        Ok(Self { pool, path })
    }
}

impl Contender for RawSqlite {
    async fn execute(&self, id: &str, cmd: &Cmd) -> Result<(), BenchError> {
        let rows: Vec<(i64, String, String)> = sqlx::query_as(RAW_SELECT)
            .bind("account")
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        let (mut open, mut balance, mut version) = (false, 0_i64, 0_i64);
        for (v, event_type, payload) in rows {
            version = v;
            match event_type.as_str() {
                "AccountOpened" => open = true,
                "MoneyDeposited" => {
                    balance += serde_json::from_str::<MoneyDeposited>(&payload)?.amount;
                }
                other => return Err(format!("unexpected event type {other}").into()),
            }
        }
        black_box(balance);
        cmd.validate(open)?;
        let event = cmd.event();
        sqlx::query(RAW_INSERT)
            .bind("account")
            .bind(id)
            .bind(version + 1)
            .bind(uuid::Uuid::now_v7().as_bytes().to_vec())
            .bind(cqrs_core::EventSet::event_type(&event))
            .bind(i64::from(cqrs_core::EventSet::schema_version(&event)))
            .bind(cqrs_core::EventSet::encode(&event)?.to_string())
            .bind(now_micros())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn stored_events(&self) -> Result<i64, BenchError> {
        count_events(&self.pool).await
    }

    async fn finish(self) -> Result<(), BenchError> {
        self.pool.close().await;
        remove_db(&self.path);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum W1Kind {
    #[cfg(feature = "peers")]
    SqliteEs,
    Raw,
    Ours,
    OursCache,
}

impl W1Kind {
    fn label(self) -> &'static str {
        match self {
            #[cfg(feature = "peers")]
            W1Kind::SqliteEs => "cqrs-es 0.5 + sqlite-es 0.5",
            W1Kind::Raw => "raw sqlx (SQLite): read stream, then one INSERT",
            W1Kind::Ours => "ours, no aggregate cache (`without_cache`)",
            W1Kind::OursCache => "ours, defaults (group commit built in + aggregate cache)",
        }
    }

    async fn start(self, clients: usize) -> Result<W1Live, BenchError> {
        let name = format!("w1_{self:?}_{clients}");
        Ok(match self {
            #[cfg(feature = "peers")]
            W1Kind::SqliteEs => W1Live::SqliteEs(Box::new(
                crate::peers::SqliteEs::new(&temp_db(&name)?).await?,
            )),
            W1Kind::Raw => W1Live::Raw(RawSqlite::new(&name).await?),
            W1Kind::Ours => W1Live::Ours(OursSqlite::new(&name, false).await?),
            W1Kind::OursCache => W1Live::Ours(OursSqlite::new(&name, true).await?),
        })
    }
}

enum W1Live {
    #[cfg(feature = "peers")]
    SqliteEs(Box<crate::peers::SqliteEs>),
    Raw(RawSqlite),
    Ours(OursSqlite),
}

impl Contender for W1Live {
    async fn execute(&self, id: &str, cmd: &Cmd) -> Result<(), BenchError> {
        match self {
            #[cfg(feature = "peers")]
            W1Live::SqliteEs(c) => c.execute(id, cmd).await,
            W1Live::Raw(c) => c.execute(id, cmd).await,
            W1Live::Ours(c) => c.execute(id, cmd).await,
        }
    }

    async fn stored_events(&self) -> Result<i64, BenchError> {
        match self {
            #[cfg(feature = "peers")]
            W1Live::SqliteEs(c) => c.stored_events().await,
            W1Live::Raw(c) => c.stored_events().await,
            W1Live::Ours(c) => c.stored_events().await,
        }
    }

    async fn finish(self) -> Result<(), BenchError> {
        match self {
            #[cfg(feature = "peers")]
            W1Live::SqliteEs(c) => (*c).finish().await,
            W1Live::Raw(c) => c.finish().await,
            W1Live::Ours(c) => c.finish().await,
        }
    }
}

async fn w1(config: &Config) -> Result<Table, BenchError> {
    let kinds = [
        #[cfg(feature = "peers")]
        W1Kind::SqliteEs,
        W1Kind::Raw,
        W1Kind::Ours,
        W1Kind::OursCache,
    ];
    let clients = config.clients.clone().unwrap_or_else(|| vec![1, 8]);
    let Interleaved { rates, cpu } = interleave(
        &kinds,
        &clients,
        config.rounds,
        |kind, c| kind.start(c),
        W1Kind::label,
    )
    .await?;
    let get = |kind: W1Kind, c: usize| rates.get(&(kind, c)).map(|v| median(v));
    #[cfg(feature = "peers")]
    let peer = |c| get(W1Kind::SqliteEs, c);
    #[cfg(not(feature = "peers"))]
    let peer = |_c: usize| None::<f64>;
    let mut table = Table::new(
        "SQLite: W1 command throughput (commands/s, higher is better)",
        &[
            "contender",
            "1 client",
            "vs sqlite-es",
            "vs raw read+INSERT",
            "8 clients",
            "vs sqlite-es",
            "vs raw read+INSERT",
            "machine CPU µs/cmd (1 / 8 clients)",
        ],
    );
    for kind in kinds {
        let empty = Vec::new();
        let one = rates.get(&(kind, 1)).unwrap_or(&empty);
        let eight = rates.get(&(kind, 8)).unwrap_or(&empty);
        table.row(vec![
            kind.label().to_owned(),
            rate(one),
            ratio(median(one), peer(1)),
            ratio(median(one), get(W1Kind::Raw, 1)),
            rate(eight),
            ratio(median(eight), peer(8)),
            ratio(median(eight), get(W1Kind::Raw, 8)),
            format!(
                "{} / {}",
                micros(cpu.get(&(kind, 1)).map_or(&[], Vec::as_slice)),
                micros(cpu.get(&(kind, 8)).map_or(&[], Vec::as_slice))
            ),
        ]);
    }
    if !cfg!(feature = "peers") {
        table.note("sqlite-es not measured: built without `--features peers`.");
    }
    table.note(format!(
        "The W1 workload and protocol of the PostgreSQL table ({} accounts × {} commands per cell and round, \
         untimed warm-up of {} accounts, turns of one account per client rotating the order; median of {} round(s), range in parentheses), \
         on SQLite: every contender has a fresh file of its own in the same temp directory (one ext4 file system), \
         WAL mode and `synchronous = FULL` (each acknowledged command survives a power cut), and {CONNECTIONS} pooled connections \
         (ours: {CONNECTIONS} read connections plus its writer's own). sqlite-es gets the tables of its `migrations/` \
         and, like the raw SQL, the busy handler of sqlx for concurrent writers; ours queues appends to one writer \
         that commits each queued group in one transaction. Goals (issue: cqrs-sqlite): ≥ 2× sqlite-es at 1 client, ≥ 4× at 8 clients, \
         ≥ 0.9× the raw read+INSERT at 1 client.",
        crate::w1::ACCOUNTS,
        crate::w1::COMMANDS_PER_ACCOUNT,
        crate::w1::WARM_UP_ACCOUNTS,
        config.rounds
    ));
    Ok(table)
}

// ---------------------------------------------------------------------------------------------
// Batch append

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AppendKind {
    Raw,
    Ours,
}

impl AppendKind {
    fn label(self) -> &'static str {
        match self {
            AppendKind::Raw => "raw sqlx: one multi-row INSERT into our events table (autocommit)",
            AppendKind::Ours => "ours: `SqliteStore::append` (guarded, checked, group commit)",
        }
    }
}

struct AppendLive {
    kind: AppendKind,
    store: SqliteStore,
    path: PathBuf,
    sql: Arc<String>,
}

pub(crate) fn raw_batch_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO events (stream_type, stream_id, stream_version, event_id, event_type, \
         schema_version, payload, metadata, recorded_at) VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push_str("(?, ?, ?, ?, ?, ?, ?, ?, ?)");
    }
    sql
}

async fn raw_batch(pool: &SqlitePool, sql: &str, batch: Batch) -> Result<(), BenchError> {
    let recorded_at = now_micros();
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (offset, event) in (1_i64..).zip(&batch.events) {
        query = query
            .bind(batch.stream.stream_type().to_owned())
            .bind(batch.stream.id().to_owned())
            .bind(i64::try_from(batch.base)? + offset)
            .bind(event.event_id.as_uuid().as_bytes().to_vec())
            .bind(event.event_type.clone())
            .bind(i64::from(event.schema_version))
            .bind(event.payload.to_string())
            .bind(serde_json::to_string(&event.metadata)?)
            .bind(recorded_at);
    }
    query.execute(pool).await?;
    Ok(())
}

impl AppendLive {
    async fn start(kind: AppendKind, clients: usize) -> Result<Self, BenchError> {
        let path = temp_db(&format!("append_{kind:?}_{clients}"))?;
        let store = our_store(&path).await?;
        Ok(Self {
            kind,
            store,
            path,
            sql: Arc::new(raw_batch_sql(BATCH)),
        })
    }

    async fn turn(&self, batches: Vec<Batch>) -> Result<f64, BenchError> {
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for batch in batches {
            let (kind, store, sql) = (self.kind, self.store.clone(), Arc::clone(&self.sql));
            tasks.spawn(async move {
                match kind {
                    AppendKind::Ours => {
                        let expected = if batch.base == 0 {
                            ExpectedVersion::NoStream
                        } else {
                            ExpectedVersion::Exact(StreamVersion::new(batch.base))
                        };
                        store.append(&batch.stream, expected, batch.events).await?;
                    }
                    AppendKind::Raw => raw_batch(store.pool(), &sql, batch).await?,
                }
                Ok::<_, BenchError>(())
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(started.elapsed().as_secs_f64())
    }

    async fn finish(self, expected: usize) -> Result<(), BenchError> {
        let stored = count_events(self.store.pool()).await?;
        if stored != expected as i64 {
            return Err(format!("expected {expected} events, found {stored}").into());
        }
        self.store.close().await;
        drop(self.store);
        remove_db(&self.path);
        Ok(())
    }
}

async fn append(config: &Config) -> Result<Table, BenchError> {
    let total = if config.quick { 20_000 } else { 100_000 };
    let kinds = [AppendKind::Raw, AppendKind::Ours];
    let clients = [1_usize, 8];
    let mut results: HashMap<(AppendKind, usize), Vec<f64>> = HashMap::new();
    for &c in &clients {
        let mut live = Vec::with_capacity(kinds.len());
        for kind in kinds {
            live.push(AppendLive::start(kind, c).await?);
        }
        for round in 0..config.rounds {
            let mut seconds = vec![0.0_f64; live.len()];
            let mut work: Vec<std::vec::IntoIter<Batch>> = workload(total, c, round)
                .into_iter()
                .map(Vec::into_iter)
                .collect();
            let turns = total / BATCH / c;
            for turn in 0..turns {
                let batches: Vec<Batch> = work.iter_mut().filter_map(Iterator::next).collect();
                for k in 0..live.len() {
                    let i = (round * turns + turn + k) % live.len();
                    seconds[i] += live[i].turn(batches.clone()).await?;
                }
            }
            for (contender, s) in live.iter().zip(&seconds) {
                let r = (turns * c * BATCH) as f64 / s;
                eprintln!(
                    "   round {round}: {} @ {c} clients: {r:.0} events/s",
                    contender.kind.label()
                );
                results.entry((contender.kind, c)).or_default().push(r);
            }
        }
        let expected = config.rounds * (total / BATCH / c) * c * BATCH;
        for contender in live {
            contender.finish(expected).await?;
        }
    }
    let get = |k: AppendKind, c: usize| results.get(&(k, c)).map(|v| median(v));
    let mut table = Table::new(
        format!("SQLite: batch append, {BATCH}-event batches (events/s, higher is better)"),
        &["contender", "1 client", "vs raw", "8 clients", "vs raw"],
    );
    for kind in kinds {
        let empty = Vec::new();
        let one = results.get(&(kind, 1)).unwrap_or(&empty);
        let eight = results.get(&(kind, 8)).unwrap_or(&empty);
        table.row(vec![
            kind.label().to_owned(),
            rate(one),
            ratio(median(one), get(AppendKind::Raw, 1)),
            rate(eight),
            ratio(median(eight), get(AppendKind::Raw, 8)),
        ]);
    }
    table.note(format!(
        "{total} events per cell and round as batches of {BATCH} (streams of 1,000 events), the two contenders alive at once, \
         each on a fresh file of its own (our migrated schema for both: same table, same indexes and triggers), \
         taking turns of one batch per client, rotating the order. The raw statement is one `INSERT … VALUES` of {BATCH} rows \
         with the version the client already knows, on the pool (autocommit; concurrent writers wait in SQLite's busy handler); \
         ours checks the expected version in the write transaction and returns positions, through its writer. \
         WAL, `synchronous = FULL`. Goal: ours ≥ 0.85× raw. Median of {} round(s).",
        config.rounds
    ));
    Ok(table)
}

// ---------------------------------------------------------------------------------------------
// Catch-up

/// Events stored before the catch-up.
const CATCHUP_EVENTS: usize = 100_000;
const CATCHUP_STREAMS: usize = 100;
/// Events per read (the runner's default batch).
const READ_BATCH: usize = 500;

/// Seeds `streams` streams of `events / streams` events (open + deposits) from 8 tasks, in
/// appends of 1,000.
pub async fn seed(store: &SqliteStore, events: usize, streams: usize) -> Result<(), BenchError> {
    let per_stream = events / streams;
    let mut tasks = JoinSet::new();
    for client in 0..8 {
        let store = store.clone();
        tasks.spawn(async move {
            for s in (client..streams).step_by(8) {
                let stream = StreamId::new("account", format!("acc-{s:05}"));
                let mut events = vec![opened(s)];
                events.extend(deposits(s, 1, per_stream - 1));
                let mut expected = ExpectedVersion::NoStream;
                for chunk in events.chunks(1_000) {
                    let r = store.append(&stream, expected, chunk.to_vec()).await?;
                    expected = ExpectedVersion::Exact(r.stream_version);
                }
            }
            Ok::<_, BenchError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

#[derive(Default)]
struct Noop {
    seen: u64,
}

impl Projection for Noop {
    const NAME: &'static str = "noop";
    const EVENT_TYPES: &'static [&'static str] = &["AccountOpened", "MoneyDeposited"];
    type Context = ();

    fn handle<'a>(
        &'a mut self,
        event: &'a RecordedEvent,
        _: &'a mut (),
    ) -> impl std::future::Future<Output = Result<(), ProjectionError>> + Send + 'a {
        black_box(event);
        self.seen += 1;
        std::future::ready(Ok(()))
    }
}

/// The no-op projection on `SqliteProjections`: each batch a write transaction moving the
/// checkpoint by compare-and-set.
#[derive(Default)]
struct SqliteNoop {
    seen: u64,
}

impl Projection for SqliteNoop {
    const NAME: &'static str = "sqlite_noop";
    const EVENT_TYPES: &'static [&'static str] = &["AccountOpened", "MoneyDeposited"];
    type Context = SqliteConnection;

    fn handle<'a>(
        &'a mut self,
        event: &'a RecordedEvent,
        _: &'a mut SqliteConnection,
    ) -> impl std::future::Future<Output = Result<(), ProjectionError>> + Send + 'a {
        black_box(event);
        self.seen += 1;
        std::future::ready(Ok(()))
    }
}

#[allow(clippy::expect_used)] // a batch size above zero is the only requirement
fn runner_config() -> RunnerConfig {
    RunnerConfig::builder()
        .batch_size(READ_BATCH)
        .build()
        .expect("a batch size above zero is valid")
}

/// Raw keyset read by the row key, same columns as the store reads; `parse` also parses the JSON
/// payload and metadata.
async fn raw_read(pool: &SqlitePool, parse: bool) -> Result<u64, BenchError> {
    type Row = (
        i64,
        String,
        String,
        i64,
        Vec<u8>,
        String,
        i64,
        String,
        String,
        i64,
    );
    let mut after = 0_i64;
    let mut seen = 0_u64;
    loop {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT position, stream_type, stream_id, stream_version, event_id, event_type, \
             schema_version, payload, metadata, recorded_at FROM events WHERE position > ?1 \
             ORDER BY position LIMIT ?2",
        )
        .bind(after)
        .bind(READ_BATCH as i64)
        .fetch_all(pool)
        .await?;
        let n = rows.len();
        for row in rows {
            after = row.0;
            if parse {
                let payload: serde_json::Value = serde_json::from_str(&row.7)?;
                let metadata: serde_json::Value = serde_json::from_str(&row.8)?;
                black_box((payload, metadata));
            }
            black_box(row);
            seen += 1;
        }
        if n < READ_BATCH {
            return Ok(seen);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum ReadKind {
    RawRows,
    RawParsed,
    StoreRead,
    Noop,
    SqliteNoop,
}

impl ReadKind {
    fn label(self) -> &'static str {
        match self {
            ReadKind::RawRows => "raw keyset read by `position` (rows only)",
            ReadKind::RawParsed => "raw keyset read by `position` + JSON parse",
            ReadKind::StoreRead => "ours: `read_all_batched` (`read_all`, no runner)",
            ReadKind::Noop => "ours: `ProjectionRunner::catch_up` on `InProcess`, no-op",
            ReadKind::SqliteNoop => {
                "ours: `ProjectionRunner::catch_up` on `SqliteProjections`, no-op (checkpoint CAS + commit per batch)"
            }
        }
    }

    async fn read(self, store: &SqliteStore) -> Result<u64, BenchError> {
        match self {
            ReadKind::RawRows => raw_read(store.pool(), false).await,
            ReadKind::RawParsed => raw_read(store.pool(), true).await,
            ReadKind::StoreRead => {
                let events = read_all_batched(store, Position::START, EventTypes::All, READ_BATCH);
                futures_util::pin_mut!(events);
                let mut seen = 0;
                while let Some(event) = events.try_next().await? {
                    black_box(event);
                    seen += 1;
                }
                Ok(seen)
            }
            ReadKind::Noop => {
                let runner = ProjectionRunner::new(Noop::default(), InProcess::new(store.clone()))
                    .with_config(runner_config());
                Ok(runner.catch_up().await?.seen)
            }
            ReadKind::SqliteNoop => {
                let runner = ProjectionRunner::new(
                    SqliteNoop::default(),
                    SqliteProjections::new(store.clone()),
                )
                .named(format!("noop_{}", uuid::Uuid::now_v7().simple()))
                .with_config(runner_config());
                Ok(runner.catch_up().await?.seen)
            }
        }
    }
}

async fn catchup(config: &Config) -> Result<Table, BenchError> {
    let path = temp_db("catchup")?;
    let store = our_store(&path).await?;
    let seeding = Instant::now();
    seed(&store, CATCHUP_EVENTS, CATCHUP_STREAMS).await?;
    eprintln!(
        "   seeded {CATCHUP_EVENTS} events in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    let kinds = [
        ReadKind::RawRows,
        ReadKind::RawParsed,
        ReadKind::StoreRead,
        ReadKind::Noop,
        ReadKind::SqliteNoop,
    ];
    // One unmeasured pass warms the page cache for everyone.
    raw_read(store.pool(), false).await?;
    let rounds = config.rounds.max(2);
    let mut results: HashMap<ReadKind, Vec<f64>> = HashMap::new();
    for round in 0..rounds {
        let mut order = kinds.to_vec();
        order.rotate_left(round % kinds.len());
        for kind in order {
            let started = Instant::now();
            let seen = kind.read(&store).await?;
            let r = seen as f64 / started.elapsed().as_secs_f64();
            if seen != CATCHUP_EVENTS as u64 {
                return Err(format!("{} saw {seen} of {CATCHUP_EVENTS}", kind.label()).into());
            }
            eprintln!("   {}: {r:.0} events/s", kind.label());
            results.entry(kind).or_default().push(r);
        }
    }
    store.close().await;
    drop(store);
    remove_db(&path);
    let base = |k: ReadKind| results.get(&k).map(|v| median(v));
    let mut table = Table::new(
        format!(
            "SQLite: catch-up over {CATCHUP_EVENTS} stored events (events/s, higher is better)"
        ),
        &[
            "reader",
            "events/s",
            "vs raw rows only",
            "vs raw + JSON parse",
        ],
    );
    for kind in kinds {
        let empty = Vec::new();
        let v = results.get(&kind).unwrap_or(&empty);
        table.row(vec![
            kind.label().to_owned(),
            rate(v),
            ratio(median(v), base(ReadKind::RawRows)),
            ratio(median(v), base(ReadKind::RawParsed)),
        ]);
    }
    table.note(format!(
        "{CATCHUP_EVENTS} events ({CATCHUP_STREAMS} streams of {}, ~230-byte payloads) in one file, read through the store's own pool \
         ({CONNECTIONS} connections) by every reader, {READ_BATCH} events per query, the same columns. The raw read decodes each row into a tuple \
         (strings, the id's bytes); ours decodes it into a `RecordedEvent` whose payload and metadata stay text until a projection \
         decodes them, so the like-for-like baseline is the raw read (\"raw + JSON parse\" shows what parsing both on read costs). Goal: `read_all` ≥ 0.8× a raw keyset read. Median of {rounds} rounds, \
         order rotating, file warm in the page cache.",
        CATCHUP_EVENTS / CATCHUP_STREAMS
    ));
    Ok(table)
}

/// Runs the SQLite set: W1, batch append, catch-up and the peak memory of a long stream's load.
/// The W1 table alone (`--only sqlite-w1`).
pub async fn run_w1(config: &Config) -> Result<Vec<Table>, BenchError> {
    let table = w1(config).await;
    remove_temp_dir();
    Ok(vec![table?])
}

/// The batch-append table alone (`--only sqlite-append`).
pub async fn run_append(config: &Config) -> Result<Vec<Table>, BenchError> {
    let table = append(config).await;
    remove_temp_dir();
    Ok(vec![table?])
}

/// Removes this process's temp directory of databases (`temp_db`).
pub fn remove_temp_dir() {
    let _ = std::fs::remove_dir_all(
        std::env::temp_dir().join(format!("cqrs-bench-{}", std::process::id())),
    );
}

pub async fn run(config: &Config) -> Result<Vec<Table>, BenchError> {
    let mut tables = Vec::new();
    eprintln!("   -- W1");
    tables.push(w1(config).await?);
    eprintln!("   -- batch append");
    tables.push(append(config).await?);
    eprintln!("   -- catch-up");
    tables.push(catchup(config).await?);
    eprintln!("   -- memory");
    tables.push(crate::memory::run_sqlite(config).await?);
    remove_temp_dir();
    Ok(tables)
}
