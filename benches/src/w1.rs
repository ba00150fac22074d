//! W1 command throughput: 200 accounts × (open + 9 deposits with a 100-byte memo), one command per
//! execute, with 1 sequential client and with 8 concurrent clients (each owning 25 accounts).

use std::collections::HashMap;
use std::future::Future;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cqrs_core::{EventSet, Repository};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgPool, Postgres};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::domain::{account_id, w1_commands, Account, Cmd, MoneyDeposited};
use crate::report::{median, rate, ratio, Table};
use crate::{db, BenchError, Config};

/// Accounts in the workload.
pub const ACCOUNTS: usize = 200;
/// Commands per account (open + 9 deposits).
pub const COMMANDS_PER_ACCOUNT: usize = 10;

/// Something that executes one workload command end to end (decide against the stream's state,
/// then store the event durably).
pub trait Contender: Send + Sync + 'static {
    /// Executes `cmd` on account `id`.
    fn execute(&self, id: &str, cmd: &Cmd) -> impl Future<Output = Result<(), BenchError>> + Send;
    /// How many events are stored now (checked after each run: every command must have written one).
    fn stored_events(&self) -> impl Future<Output = Result<i64, BenchError>> + Send;
    /// Drops the contender's schema.
    fn finish(self) -> impl Future<Output = Result<(), BenchError>> + Send;
}

/// Accounts of the untimed warm-up each contender runs before its first turn (ids outside the
/// workload's, same commands, same client count).
pub const WARM_UP_ACCOUNTS: usize = 16;

/// One timed turn ([`timed_turn`]), or the sum of several.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timed {
    /// Wall-clock seconds of the measured commands.
    pub seconds: f64,
    /// Commands executed.
    pub commands: usize,
    /// CPU seconds the whole machine spent busy meanwhile (benchmark, PostgreSQL and anything
    /// else: the contenders take turns, so the rest is noise they share); `None` where
    /// `/proc/stat` cannot be read.
    pub busy: Option<f64>,
}

/// CPU time the machine has spent busy since boot (all CPUs: user, nice, system, irq and softirq
/// time), in seconds, from `/proc/stat` (Linux; `None` elsewhere).
fn machine_busy() -> Option<f64> {
    busy_seconds(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// The busy seconds in the text of `/proc/stat`. Its first line sums all CPUs, in ticks: user,
/// nice, system, idle, iowait, irq, softirq, steal (taken by the hypervisor, not ours), then
/// guest and guest_nice (already counted in user and nice).
fn busy_seconds(stat: &str) -> Option<f64> {
    let ticks: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let busy: u64 = [0, 1, 2, 5, 6]
        .iter()
        .map(|&i| ticks.get(i))
        .sum::<Option<u64>>()?;
    // In USER_HZ ticks: 100 per second on x86 and ARM Linux.
    Some(busy as f64 / 100.0)
}

/// Runs the untimed warm-up on `contender`: [`WARM_UP_ACCOUNTS`] accounts of the same workload on
/// ids of their own, with `clients` clients. A fresh pool's connections have prepared nothing yet,
/// and PostgreSQL plans each prepared statement afresh for its first five executions per
/// connection (0.3-0.5 ms here for a multi-CTE statement, against 0.05 ms once the plan is
/// cached): timed, that start-up would weigh on the first turns, where a service on long-lived
/// connections pays it once.
pub async fn warm_up<C: Contender>(contender: &Arc<C>, clients: usize) -> Result<(), BenchError> {
    let accounts = (0..WARM_UP_ACCOUNTS)
        .map(|i| (format!("warm-{i:03}"), w1_commands(i)))
        .collect();
    run_clients(contender, clients, accounts).await
}

/// Runs accounts `accounts` of the workload with `clients` concurrent clients on `contender`;
/// returns how long they took and how much of the machine they used.
pub async fn timed_turn<C: Contender>(
    contender: &Arc<C>,
    clients: usize,
    accounts: Range<usize>,
) -> Result<Timed, BenchError> {
    let commands = accounts.len() * COMMANDS_PER_ACCOUNT;
    let workload = accounts.map(|i| (account_id(i), w1_commands(i))).collect();
    let busy_before = machine_busy();
    let started = Instant::now();
    run_clients(contender, clients, workload).await?;
    let seconds = started.elapsed().as_secs_f64();
    let busy = machine_busy()
        .zip(busy_before)
        .map(|(after, before)| after - before);
    Ok(Timed {
        seconds,
        commands,
        busy,
    })
}

/// Checks that `contender` stored exactly `expected` events (one per command), then drops its
/// schema.
pub async fn check_and_finish<C: Contender>(
    contender: Arc<C>,
    expected: usize,
) -> Result<(), BenchError> {
    let stored = contender.stored_events().await?;
    if stored != expected as i64 {
        return Err(format!("expected {expected} stored events, found {stored}").into());
    }
    let contender = Arc::into_inner(contender).ok_or("contender still shared")?;
    contender.finish().await
}

/// Executes every account's commands in order, the accounts dealt round-robin to `clients`
/// concurrent clients.
async fn run_clients<C: Contender>(
    contender: &Arc<C>,
    clients: usize,
    accounts: Vec<(String, Vec<Cmd>)>,
) -> Result<(), BenchError> {
    let mut chunks: Vec<Vec<(String, Vec<Cmd>)>> = vec![Vec::new(); clients];
    for (i, account) in accounts.into_iter().enumerate() {
        chunks[i % clients].push(account);
    }
    let mut tasks = JoinSet::new();
    for chunk in chunks {
        let contender = Arc::clone(contender);
        tasks.spawn(async move {
            for (id, commands) in &chunk {
                for cmd in commands {
                    contender.execute(id, cmd).await?;
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

/// Ours: `Repository<Account>` over `PostgresStore`, with its defaults or with the aggregate
/// cache and/or group commit turned off.
pub struct Ours {
    pub(crate) repo: Repository<Account>,
    place: Place,
}

impl Ours {
    /// A fresh schema; the defaults when `cache` and `group` are both true, else the one(s)
    /// false turned off (`Repository::without_cache`, `PostgresStore::without_group_commit`).
    pub async fn new(url: &str, name: &str, cache: bool, group: bool) -> Result<Self, BenchError> {
        let schema = db::schema_name(name);
        let mut store = db::our_store(url, &schema).await?;
        if !group {
            store = store.without_group_commit();
        }
        let pool = store.pool().clone();
        let mut repo = Repository::new(store);
        if !cache {
            repo = repo.without_cache();
        }
        Ok(Self {
            repo,
            place: Place { pool, schema },
        })
    }
}

impl Contender for Ours {
    async fn execute(&self, id: &str, cmd: &Cmd) -> Result<(), BenchError> {
        self.repo.execute(id, cmd).await?;
        Ok(())
    }

    async fn stored_events(&self) -> Result<i64, BenchError> {
        self.place.stored_events().await
    }

    async fn finish(self) -> Result<(), BenchError> {
        // The store first: with group commit it may keep a connection out of the pool for a
        // moment after its last append, and closing the pool waits for every connection.
        drop(self.repo);
        self.place.finish().await
    }
}

/// A contender's own schema and pool: what it counts at the end and drops.
pub struct Place {
    pub(crate) pool: PgPool,
    pub(crate) schema: String,
}

impl Place {
    pub(crate) fn new(pool: PgPool, schema: String) -> Self {
        Self { pool, schema }
    }

    pub(crate) async fn stored_events(&self) -> Result<i64, BenchError> {
        count(&self.pool, &format!("\"{}\".events", self.schema)).await
    }

    pub(crate) async fn finish(self) -> Result<(), BenchError> {
        db::drop_schema(&self.pool, &self.schema).await?;
        self.pool.close().await;
        Ok(())
    }
}

async fn count(pool: &PgPool, table: &str) -> Result<i64, BenchError> {
    Ok(
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(pool)
            .await?,
    )
}

/// The least raw SQL for the job: read the stream, fold it, decide, then one INSERT (autocommit);
/// the unique index on the version rejects a concurrent writer.
pub struct RawReadInsert {
    place: Place,
    select: String,
    insert: String,
}

impl RawReadInsert {
    /// A fresh schema with the raw table.
    pub async fn new(url: &str, name: &str) -> Result<Self, BenchError> {
        let schema = db::schema_name(name);
        let pool = db::pool(url).await?;
        let table = db::raw_table(&pool, &schema).await?;
        Ok(Self {
            place: Place { pool, schema },
            select: format!(
                "SELECT stream_version, event_type, payload::text FROM {table}
                 WHERE stream_type = $1 AND stream_id = $2 ORDER BY stream_version"
            ),
            insert: insert_sql(&table),
        })
    }
}

/// The raw baselines' INSERT of one event (`$7` the payload's JSON text), into `table`.
pub(crate) fn insert_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} (stream_type, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
         VALUES ($1, $2, $3, $4, $5, $6, $7::json, '{{}}'::json)"
    )
}

/// Inserts the event `cmd` produces as version `version` of account `id`.
pub(crate) async fn raw_insert(
    executor: impl sqlx::PgExecutor<'_>,
    sql: &str,
    id: &str,
    version: i64,
    cmd: &Cmd,
) -> Result<(), BenchError> {
    let event = cmd.event();
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind("account")
        .bind(id)
        .bind(version)
        .bind(Uuid::now_v7())
        .bind(event.event_type())
        .bind(i32::try_from(event.schema_version())?)
        .bind(event.encode()?.to_string())
        .execute(executor)
        .await?;
    Ok(())
}

impl Contender for RawReadInsert {
    async fn execute(&self, id: &str, cmd: &Cmd) -> Result<(), BenchError> {
        let rows: Vec<(i64, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(&*self.select))
            .bind("account")
            .bind(id)
            .fetch_all(&self.place.pool)
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
        std::hint::black_box(balance);
        cmd.validate(open)?;
        raw_insert(&self.place.pool, &self.insert, id, version + 1, cmd).await
    }

    async fn stored_events(&self) -> Result<i64, BenchError> {
        self.place.stored_events().await
    }

    async fn finish(self) -> Result<(), BenchError> {
        self.place.finish().await
    }
}

/// Raw, one INSERT per command: the state is already in memory (the floor for one commit per
/// command). With `keep`, on connections it keeps (never returned to the pool between commands,
/// so without the pool's two pings per checkout): the like-for-like reference for our group
/// commit, whose slots keep their connections too.
pub struct RawInsert {
    place: Place,
    insert: String,
    state: Accounts,
    /// `Some` when keeping connections: the idle ones.
    kept: Option<Mutex<Vec<PoolConnection<Postgres>>>>,
}

impl RawInsert {
    /// A fresh schema with the raw table.
    pub async fn new(url: &str, name: &str, keep: bool) -> Result<Self, BenchError> {
        let schema = db::schema_name(name);
        let pool = db::pool(url).await?;
        let table = db::raw_table(&pool, &schema).await?;
        Ok(Self {
            place: Place { pool, schema },
            insert: insert_sql(&table),
            state: Accounts::default(),
            kept: keep.then(Mutex::default),
        })
    }
}

/// The raw contenders' state in memory: per account, whether it is open and its stream's
/// version.
#[derive(Default)]
pub(crate) struct Accounts(Mutex<HashMap<String, (bool, i64)>>);

impl Accounts {
    /// Validates `cmd` against account `id`'s state; the version its event gets.
    pub(crate) fn decide(&self, id: &str, cmd: &Cmd) -> Result<i64, BenchError> {
        let (open, version) = self
            .0
            .lock()
            .map_err(|_| "poisoned")?
            .get(id)
            .copied()
            .unwrap_or((false, 0));
        cmd.validate(open)?;
        Ok(version + 1)
    }

    /// Records that account `id`'s event `version` is stored.
    pub(crate) fn stored(&self, id: &str, version: i64) -> Result<(), BenchError> {
        self.0
            .lock()
            .map_err(|_| "poisoned")?
            .insert(id.to_owned(), (true, version));
        Ok(())
    }
}

impl Contender for RawInsert {
    async fn execute(&self, id: &str, cmd: &Cmd) -> Result<(), BenchError> {
        let version = self.state.decide(id, cmd)?;
        match &self.kept {
            None => raw_insert(&self.place.pool, &self.insert, id, version, cmd).await?,
            Some(kept) => {
                let idle = kept.lock().map_err(|_| "poisoned")?.pop();
                let mut conn = match idle {
                    Some(conn) => conn,
                    None => self.place.pool.acquire().await?,
                };
                raw_insert(&mut *conn, &self.insert, id, version, cmd).await?;
                kept.lock().map_err(|_| "poisoned")?.push(conn);
            }
        }
        self.state.stored(id, version)
    }

    async fn stored_events(&self) -> Result<i64, BenchError> {
        // The run is over: give kept connections back (with 8 clients they are the whole pool).
        if let Some(kept) = &self.kept {
            kept.lock().map_err(|_| "poisoned")?.clear();
        }
        self.place.stored_events().await
    }

    async fn finish(self) -> Result<(), BenchError> {
        self.place.finish().await
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    #[cfg(feature = "peers")]
    CqrsEs,
    RawReadInsert,
    RawInsert,
    RawInsertHeld,
    /// Neither the aggregate cache nor group commit.
    OursPlain,
    /// The aggregate cache without group commit.
    OursCache,
    /// Group commit without the aggregate cache.
    OursGroup,
    /// The defaults: `Repository::new(PostgresStore::new(pool))` (cache and group commit on).
    Ours,
    /// Raw group commit: one writer task inserts what every client queued ([`crate::raw_group`]).
    RawGroup,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            #[cfg(feature = "peers")]
            Kind::CqrsEs => "cqrs-es 0.5 + postgres-es 0.5",
            Kind::RawReadInsert => "raw sqlx: read stream, then one INSERT",
            Kind::RawInsert => "raw sqlx: one INSERT (state in memory)",
            Kind::RawInsertHeld => "raw sqlx: one INSERT, on kept connections (no pool pings)",
            Kind::OursPlain => "ours, no cache, no group commit",
            Kind::OursCache => "ours, aggregate cache only (`without_group_commit`)",
            Kind::OursGroup => "ours, group commit only (`without_cache`)",
            Kind::Ours => "ours, defaults (group commit + aggregate cache)",
            Kind::RawGroup => "raw sqlx: group INSERT (one writer task, state in memory)",
        }
    }

    /// A fresh contender of this kind for `clients` clients, on its own schema and pool.
    async fn start(self, url: &str, clients: usize) -> Result<Live, BenchError> {
        let name = format!("w1_{self:?}_{clients}");
        Ok(match self {
            #[cfg(feature = "peers")]
            Kind::CqrsEs => {
                Live::CqrsEs(Box::new(crate::peers::CqrsEs::new(url, &name, None).await?))
            }
            Kind::RawReadInsert => Live::RawReadInsert(RawReadInsert::new(url, &name).await?),
            Kind::RawInsert => Live::RawInsert(RawInsert::new(url, &name, false).await?),
            Kind::RawInsertHeld => Live::RawInsert(RawInsert::new(url, &name, true).await?),
            Kind::OursPlain => Live::Ours(Ours::new(url, &name, false, false).await?),
            Kind::OursCache => Live::Ours(Ours::new(url, &name, true, false).await?),
            Kind::OursGroup => Live::Ours(Ours::new(url, &name, false, true).await?),
            Kind::Ours => Live::Ours(Ours::new(url, &name, true, true).await?),
            Kind::RawGroup => Live::RawGroup(crate::raw_group::RawGroup::new(url, &name).await?),
        })
    }
}

/// A contender of any kind ([`Contender`]'s futures rule out `dyn`).
enum Live {
    #[cfg(feature = "peers")]
    CqrsEs(Box<crate::peers::CqrsEs>),
    RawReadInsert(RawReadInsert),
    RawInsert(RawInsert),
    Ours(Ours),
    RawGroup(crate::raw_group::RawGroup),
}

impl Contender for Live {
    async fn execute(&self, id: &str, cmd: &Cmd) -> Result<(), BenchError> {
        match self {
            #[cfg(feature = "peers")]
            Live::CqrsEs(c) => c.execute(id, cmd).await,
            Live::RawReadInsert(c) => c.execute(id, cmd).await,
            Live::RawInsert(c) => c.execute(id, cmd).await,
            Live::Ours(c) => c.execute(id, cmd).await,
            Live::RawGroup(c) => c.execute(id, cmd).await,
        }
    }

    async fn stored_events(&self) -> Result<i64, BenchError> {
        match self {
            #[cfg(feature = "peers")]
            Live::CqrsEs(c) => c.stored_events().await,
            Live::RawReadInsert(c) => c.stored_events().await,
            Live::RawInsert(c) => c.stored_events().await,
            Live::Ours(c) => c.stored_events().await,
            Live::RawGroup(c) => c.stored_events().await,
        }
    }

    async fn finish(self) -> Result<(), BenchError> {
        match self {
            #[cfg(feature = "peers")]
            Live::CqrsEs(c) => (*c).finish().await,
            Live::RawReadInsert(c) => c.finish().await,
            Live::RawInsert(c) => c.finish().await,
            Live::Ours(c) => c.finish().await,
            Live::RawGroup(c) => c.finish().await,
        }
    }
}

/// The median of `values` in whole microseconds, `n/a` if none.
pub fn micros(values: &[f64]) -> String {
    if values.is_empty() {
        "n/a".to_owned()
    } else {
        format!("{:.0}", median(values))
    }
}

/// What [`interleave`] measured: per `(contender, clients)`, the rate of each round (commands/s)
/// and the machine CPU microseconds per command of each round.
pub struct Interleaved<K> {
    /// Commands per second, one value per round.
    pub rates: HashMap<(K, usize), Vec<f64>>,
    /// Machine CPU µs per command, one value per round (none where `/proc/stat` is unreadable).
    pub cpu: HashMap<(K, usize), Vec<f64>>,
}

/// The W1 protocol for any set of contenders: for each client count, every kind is started with
/// `start(kind, clients)` and warmed up, then they take turns of one account per client, the
/// order rotating every turn, for `rounds` rounds of [`ACCOUNTS`] accounts; at the end each one's
/// stored event count is checked and it is finished.
pub async fn interleave<K, C, F, Fut>(
    kinds: &[K],
    clients: &[usize],
    rounds: usize,
    start: F,
    label: fn(K) -> &'static str,
) -> Result<Interleaved<K>, BenchError>
where
    K: Copy + Eq + std::hash::Hash,
    C: Contender,
    F: Fn(K, usize) -> Fut,
    Fut: Future<Output = Result<C, BenchError>>,
{
    let mut results: HashMap<(K, usize), Vec<f64>> = HashMap::new();
    // Machine CPU microseconds per command, per round.
    let mut cpu: HashMap<(K, usize), Vec<f64>> = HashMap::new();
    for &c in clients {
        let mut live = Vec::with_capacity(kinds.len());
        for &kind in kinds {
            let contender = Arc::new(start(kind, c).await?);
            warm_up(&contender, c).await?;
            live.push((kind, contender));
        }
        let turns = ACCOUNTS / c;
        for round in 0..rounds {
            let mut sums: HashMap<K, Timed> = HashMap::new();
            for turn in 0..turns {
                let first = round * ACCOUNTS + turn * c;
                let mut order: Vec<usize> = (0..live.len()).collect();
                order.rotate_left((round * turns + turn) % live.len());
                for i in order {
                    let (kind, contender) = &live[i];
                    let timed = timed_turn(contender, c, first..first + c).await?;
                    let sum = sums.entry(*kind).or_insert(Timed {
                        busy: Some(0.0),
                        ..Timed::default()
                    });
                    sum.seconds += timed.seconds;
                    sum.commands += timed.commands;
                    sum.busy = sum.busy.zip(timed.busy).map(|(a, b)| a + b);
                }
            }
            for &kind in kinds {
                let Some(sum) = sums.get(&kind) else { continue };
                let rate = sum.commands as f64 / sum.seconds;
                let per_command = sum.busy.map(|busy| busy * 1e6 / sum.commands as f64);
                if let Some(per_command) = per_command {
                    cpu.entry((kind, c)).or_default().push(per_command);
                }
                eprintln!(
                    "   round {round}: {} @ {c} clients: {rate:.0} cmd/s, machine CPU {} µs/cmd",
                    label(kind),
                    micros(per_command.as_slice())
                );
                results.entry((kind, c)).or_default().push(rate);
            }
        }
        let expected = (WARM_UP_ACCOUNTS + rounds * turns * c) * COMMANDS_PER_ACCOUNT;
        for (_, contender) in live {
            check_and_finish(contender, expected).await?;
        }
    }
    Ok(Interleaved {
        rates: results,
        cpu,
    })
}

/// Runs W1 for every contender, `config.rounds` times each.
///
/// For each client count, every contender is started (its own fresh schema and pool) and warmed
/// up, then they take turns: one account per client per turn (a turn of 10 commands at 1 client,
/// 80 at 8), the order rotating from turn to turn. So a burst of load from elsewhere on the
/// machine, which here lasts from milliseconds to minutes, hits every contender alike. A round
/// runs all [`ACCOUNTS`] accounts through every contender (new ids each round); a cell's rate is
/// the round's commands over the sum of its turns' times.
pub async fn run(config: &Config) -> Result<Vec<Table>, BenchError> {
    let kinds = [
        #[cfg(feature = "peers")]
        Kind::CqrsEs,
        Kind::RawReadInsert,
        Kind::RawInsert,
        Kind::RawInsertHeld,
        Kind::OursPlain,
        Kind::OursCache,
        Kind::OursGroup,
        Kind::RawGroup,
        Kind::Ours,
    ];
    let clients = [1_usize, 8];
    let Interleaved {
        rates: results,
        cpu,
    } = interleave(
        &kinds,
        &clients,
        config.rounds,
        |kind, c| kind.start(&config.url, c),
        Kind::label,
    )
    .await?;
    let get = |kind: Kind, c: usize| results.get(&(kind, c)).map(|v| median(v));
    #[cfg(feature = "peers")]
    let cqrs_es = |c| get(Kind::CqrsEs, c);
    #[cfg(not(feature = "peers"))]
    let cqrs_es = |_c: usize| None::<f64>;
    let mut table = Table::new(
        "W1 command throughput (commands/s, higher is better)",
        &[
            "contender",
            "1 client",
            "vs raw read+INSERT",
            "vs raw one-INSERT",
            "8 clients",
            "vs cqrs-es",
            "vs raw read+INSERT",
            "machine CPU µs/cmd (1 / 8 clients)",
        ],
    );
    for &kind in &kinds {
        let empty = Vec::new();
        let one = results.get(&(kind, 1)).unwrap_or(&empty);
        let eight = results.get(&(kind, 8)).unwrap_or(&empty);
        table.row(vec![
            kind.label().to_owned(),
            rate(one),
            ratio(median(one), get(Kind::RawReadInsert, 1)),
            ratio(median(one), get(Kind::RawInsert, 1)),
            rate(eight),
            ratio(median(eight), cqrs_es(8)),
            ratio(median(eight), get(Kind::RawReadInsert, 8)),
            format!(
                "{} / {}",
                micros(cpu.get(&(kind, 1)).map_or(&[], Vec::as_slice)),
                micros(cpu.get(&(kind, 8)).map_or(&[], Vec::as_slice))
            ),
        ]);
    }
    if !cfg!(feature = "peers") {
        table.note("cqrs-es not measured: built without `--features peers`.");
    }
    table.note(format!(
        "{ACCOUNTS} accounts × {COMMANDS_PER_ACCOUNT} commands = {} commands per cell and round; median of {} round(s), range in parentheses. \
         For each client count every contender runs at once, each on its own fresh schema and a pool of {} connections, \
         after an untimed warm-up of {WARM_UP_ACCOUNTS} accounts (so prepared statements are planned and cached, as on a service's long-lived connections); \
         then they take turns of one account per client (10 commands at 1 client, 80 at 8), rotating the order every turn, \
         so that noise from elsewhere on the machine hits them alike; a round gives every contender all {ACCOUNTS} accounts (new ids each round), \
         and the stored event count of each is checked at the end. A cell's rate is the round's commands over the sum of its turns' times. \
         Machine CPU per command: the busy time of all CPUs (`/proc/stat`: benchmark, PostgreSQL and anything else) \
         during the turns, over their commands, median of the rounds; it shows how much of the machine \
         a command uses, where the rate also reflects waiting (a WAL flush, a busy slot).",
        ACCOUNTS * COMMANDS_PER_ACCOUNT,
        config.rounds,
        db::POOL_SIZE
    ));
    Ok(vec![table])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_time_leaves_out_idle_io_wait_steal_and_guest() {
        let stat = "cpu  300 20 80 5000 600 0 4 0 0 0\ncpu0 150 10 40 2500 300 0 2 0 0 0\n";
        let busy = busy_seconds(stat).expect("parsed");
        assert!((busy - 4.04).abs() < 1e-9, "{busy}");
        // Steal, guest and guest_nice are not counted (guest time is inside user and nice).
        let virtualized = "cpu  300 20 80 5000 600 0 4 70 50 10\n";
        assert_eq!(busy_seconds(virtualized), Some(busy));
        assert_eq!(busy_seconds("intr 1 2 3\n"), None);
        assert_eq!(busy_seconds("cpu  1 2 x\n"), None);
    }
}
