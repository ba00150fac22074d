//! Read models in their own stores: catch-up of a Redis read model (`RedisProjections`) and of a
//! PostgreSQL read model in another database (`PostgresProjections::with_event_source`), each
//! against the raw read of the same events plus the raw write of the same rows.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Instant;

use cqrs_core::projection;
use cqrs_core::subscription::{ProjectionRunner, RunnerConfig};
use cqrs_core::RecordedEvent;
use cqrs_postgres::{PostgresProjections, PostgresStore};
use cqrs_redis::{RedisBatch, RedisProjections};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};

use crate::catchup::{seed, EVENTS, STREAMS};
use crate::domain::{AccountOpened, MoneyDeposited};
use crate::report::{median, rate, ratio, Table};
use crate::{db, BenchError, Config};

/// Events per read (the runner's default batch).
const BATCH: usize = 500;
/// The read-model schema in the read database.
const READ_SCHEMA: &str = "read";

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned())
}

#[allow(clippy::expect_used)] // a batch size above zero is the only requirement
fn runner_config() -> RunnerConfig {
    RunnerConfig::builder()
        .batch_size(BATCH)
        .build()
        .expect("a batch size above zero is valid")
}

fn fresh(what: &str) -> String {
    format!("{what}_{}", uuid::Uuid::now_v7().simple())
}

/// The amount a row of the read model gets: the deposit's, 0 for an opening.
fn amount(event_type: &str, payload: &str) -> Result<i64, BenchError> {
    Ok(match event_type {
        "MoneyDeposited" => serde_json::from_str::<MoneyDeposited>(payload)?.amount,
        "AccountOpened" => 0,
        other => return Err(format!("unexpected event type {other}").into()),
    })
}

/// One page of the raw keyset read of the event store (by its primary key `(tx, position)`, not
/// gap-free; `tx` is selected as `tx_text`, for `ORDER BY tx` to mean the column, not the text):
/// `(position, tx, stream_id, event_id, event_type, payload)`, the columns the job needs.
type RawEvent = (i64, String, String, uuid::Uuid, String, String);

/// Reads the whole log in pages of [`BATCH`], calling `write` with each page's rows
/// `(event_id, account, amount)` and the page's last `(tx, position)`.
async fn raw_pages<F, Fut>(events: &PostgresStore, mut write: F) -> Result<u64, BenchError>
where
    F: FnMut(Vec<uuid::Uuid>, Vec<String>, Vec<i64>, (String, i64)) -> Fut,
    Fut: std::future::Future<Output = Result<(), BenchError>>,
{
    let sql = format!(
        "SELECT position, tx::text AS tx_text, stream_id, event_id, event_type, payload::text
         FROM \"{}\".events WHERE (tx, position) > ($1::text::xid8, $2) ORDER BY tx, position LIMIT $3",
        events.schema()
    );
    let (mut after_tx, mut after) = ("0".to_owned(), 0_i64);
    let mut seen = 0_u64;
    loop {
        let rows: Vec<RawEvent> = sqlx::query_as(sqlx::AssertSqlSafe(sql.as_str()))
            .bind(&after_tx)
            .bind(after)
            .bind(BATCH as i64)
            .fetch_all(events.pool())
            .await?;
        let n = rows.len();
        let (mut ids, mut accounts, mut amounts) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (position, tx, stream_id, event_id, event_type, payload) in rows {
            amounts.push(amount(&event_type, &payload)?);
            ids.push(event_id);
            accounts.push(stream_id);
            after = position;
            after_tx = tx;
        }
        seen += n as u64;
        if n > 0 {
            write(ids, accounts, amounts, (after_tx.clone(), after)).await?;
        }
        if n < BATCH {
            return Ok(seen);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL read model in another database

/// One row per event in the read database, written once per batch (`#[flush]`, one `INSERT …
/// SELECT FROM UNNEST`) in the batch's transaction, with the checkpoint.
struct PgRows {
    table: String,
    ids: Vec<uuid::Uuid>,
    accounts: Vec<String>,
    amounts: Vec<i64>,
    seen: u64,
}

#[projection(name = "read_rows")]
impl PgRows {
    fn on_opened(&mut self, _: &AccountOpened, meta: &RecordedEvent, _: &mut PgConnection) {
        self.push(meta, 0);
    }

    fn on_deposited(&mut self, event: &MoneyDeposited, meta: &RecordedEvent, _: &mut PgConnection) {
        self.push(meta, event.amount);
    }

    #[helper]
    fn push(&mut self, meta: &RecordedEvent, amount: i64) {
        self.ids.push(*meta.event_id.as_uuid());
        self.accounts.push(meta.stream.id().to_owned());
        self.amounts.push(amount);
        self.seen += 1;
    }

    #[flush]
    async fn write(&mut self, db: &mut PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(insert_rows(&self.table)))
            .bind(std::mem::take(&mut self.ids))
            .bind(std::mem::take(&mut self.accounts))
            .bind(std::mem::take(&mut self.amounts))
            .execute(db)
            .await?;
        Ok(())
    }

    #[discard]
    fn forget(&mut self) {
        self.ids.clear();
        self.accounts.clear();
        self.amounts.clear();
    }
}

fn insert_rows(table: &str) -> String {
    format!(
        "INSERT INTO {table} (event_id, account, amount)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bigint[])"
    )
}

/// The read database: its own database on the same server, created for the run.
struct ReadDb {
    admin: PgPool,
    name: String,
    pool: PgPool,
    store: PostgresStore,
}

impl ReadDb {
    async fn create(url: &str) -> Result<Self, BenchError> {
        let admin = PgPoolOptions::new().max_connections(1).connect(url).await?;
        let name = db::schema_name("read");
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{name}\""
        )))
        .execute(&admin)
        .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE \"{name}\"")))
            .execute(&admin)
            .await?;
        let options = PgConnectOptions::from_str(url)?.database(&name);
        let pool = PgPoolOptions::new()
            .max_connections(db::POOL_SIZE)
            .connect_with(options)
            .await?;
        let mut held = Vec::new();
        for _ in 0..db::POOL_SIZE {
            held.push(pool.acquire().await?);
        }
        drop(held);
        let store = PostgresStore::new(pool.clone()).with_schema(READ_SCHEMA)?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {READ_SCHEMA};
             CREATE TABLE {READ_SCHEMA}.raw_checkpoint (name text PRIMARY KEY, tx text NOT NULL, position bigint NOT NULL)"
        )))
        .execute(&pool)
        .await?;
        Ok(Self {
            admin,
            name,
            pool,
            store,
        })
    }

    /// A fresh, empty table for one run.
    async fn fresh_table(&self) -> Result<String, BenchError> {
        let table = format!("{READ_SCHEMA}.{}", fresh("rows"));
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE {table} (event_id uuid PRIMARY KEY, account text NOT NULL, amount bigint NOT NULL)"
        )))
        .execute(&self.pool)
        .await?;
        Ok(table)
    }

    /// Checks that `table` holds one row per event, then drops it.
    async fn check_and_drop(&self, table: &str) -> Result<(), BenchError> {
        let rows: i64 =
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
                .fetch_one(&self.pool)
                .await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {table}")))
            .execute(&self.pool)
            .await?;
        if rows != EVENTS as i64 {
            return Err(format!("{rows} rows of {EVENTS} written to {table}").into());
        }
        Ok(())
    }

    async fn drop(self) -> Result<(), BenchError> {
        drop(self.store);
        self.pool.close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
            self.name
        )))
        .execute(&self.admin)
        .await?;
        self.admin.close().await;
        Ok(())
    }
}

async fn raw_pg(
    events: &PostgresStore,
    read: &ReadDb,
    checkpoint: bool,
) -> Result<u64, BenchError> {
    let table = read.fresh_table().await?;
    let insert = insert_rows(&table);
    let name = fresh("raw");
    let seen = raw_pages(events, |ids, accounts, amounts, (tx, position)| {
        let (insert, pool, name) = (&insert, &read.pool, &name);
        async move {
            let rows = sqlx::query(sqlx::AssertSqlSafe(insert.as_str()))
                .bind(ids)
                .bind(accounts)
                .bind(amounts);
            if checkpoint {
                let mut t = pool.begin().await?;
                rows.execute(&mut *t).await?;
                sqlx::query(
                    "INSERT INTO read.raw_checkpoint (name, tx, position) VALUES ($1, $2, $3)
                     ON CONFLICT (name) DO UPDATE SET tx = excluded.tx, position = excluded.position",
                )
                .bind(name)
                .bind(tx)
                .bind(position)
                .execute(&mut *t)
                .await?;
                t.commit().await?;
            } else {
                rows.execute(pool).await?;
            }
            Ok(())
        }
    })
    .await?;
    read.check_and_drop(&table).await?;
    Ok(seen)
}

async fn ours_pg(events: &PostgresStore, read: &ReadDb) -> Result<u64, BenchError> {
    let table = read.fresh_table().await?;
    let projections =
        PostgresProjections::with_event_source(Arc::new(events.clone()), read.store.clone());
    let projection = PgRows {
        table: table.clone(),
        ids: Vec::new(),
        accounts: Vec::new(),
        amounts: Vec::new(),
        seen: 0,
    };
    let runner = ProjectionRunner::new(projection, projections)
        .named(fresh("rows"))
        .with_config(runner_config());
    let seen = runner.catch_up().await?.seen;
    read.check_and_drop(&table).await?;
    Ok(seen)
}

// ---------------------------------------------------------------------------------------------
// Redis read model

/// Balance per account in one hash: one `HINCRBY` per event (0 for an opening), queued on the
/// batch's `MULTI`/`EXEC`.
struct RedisBalances {
    seen: u64,
}

#[projection(name = "redis_balances")]
impl RedisBalances {
    fn on_opened(&mut self, _: &AccountOpened, meta: &RecordedEvent, batch: &mut RedisBatch) {
        self.incr(meta, 0, batch);
    }

    fn on_deposited(
        &mut self,
        event: &MoneyDeposited,
        meta: &RecordedEvent,
        batch: &mut RedisBatch,
    ) {
        self.incr(meta, event.amount, batch);
    }

    #[helper]
    fn incr(&mut self, meta: &RecordedEvent, amount: i64, batch: &mut RedisBatch) {
        let key = batch.key("balances");
        batch
            .pipeline()
            .hincr(key, meta.stream.id(), amount)
            .ignore();
        self.seen += 1;
    }
}

/// Checks the balances under `prefix` (every deposit is 100 cents), then deletes the prefix's
/// keys.
async fn check_redis(
    conn: &mut redis::aio::MultiplexedConnection,
    prefix: &str,
) -> Result<(), BenchError> {
    let balances: HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("{prefix}balances"))
        .query_async(conn)
        .await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(conn)
        .await?;
    if !keys.is_empty() {
        redis::cmd("DEL").arg(&keys).query_async::<()>(conn).await?;
    }
    let total: i64 = balances.values().sum();
    let expected = (EVENTS - STREAMS) as i64 * 100;
    if balances.len() != STREAMS || total != expected {
        return Err(format!(
            "redis read model under {prefix}: {} accounts, total {total} (expected {STREAMS}, {expected})",
            balances.len()
        )
        .into());
    }
    Ok(())
}

async fn raw_redis(events: &PostgresStore, checkpoint: bool) -> Result<u64, BenchError> {
    let client = redis::Client::open(redis_url())?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let prefix = format!("{}:", fresh("bench_raw"));
    let key = format!("{prefix}balances");
    let checkpoint_key = format!("{prefix}checkpoint");
    let seen = raw_pages(events, |_ids, accounts, amounts, (tx, position)| {
        let mut conn = conn.clone();
        let mut pipe = redis::pipe();
        if checkpoint {
            pipe.atomic();
        }
        for (account, amount) in accounts.iter().zip(&amounts) {
            pipe.hincr(&key, account, *amount).ignore();
        }
        if checkpoint {
            pipe.set(&checkpoint_key, format!("{tx}/{position}"))
                .ignore();
        }
        async move {
            pipe.query_async::<()>(&mut conn).await?;
            Ok(())
        }
    })
    .await?;
    check_redis(&mut conn, &prefix).await?;
    Ok(seen)
}

async fn ours_redis(events: &PostgresStore) -> Result<u64, BenchError> {
    let prefix = format!("{}:", fresh("bench_ours"));
    let projections = RedisProjections::connect(Arc::new(events.clone()), &redis_url())
        .await?
        .with_key_prefix(&prefix);
    let mut conn = projections.connection().await?;
    let runner = ProjectionRunner::new(RedisBalances { seen: 0 }, projections)
        .named("balances")
        .with_config(runner_config());
    let seen = runner.catch_up().await?.seen;
    check_redis(&mut conn, &prefix).await?;
    Ok(seen)
}

// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    RawPg,
    RawPgCheckpoint,
    OursPg,
    RawRedis,
    RawRedisCheckpoint,
    OursRedis,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::RawPg => "PostgreSQL, other database: raw keyset read + one INSERT … UNNEST per page (autocommit)",
            Kind::RawPgCheckpoint => {
                "PostgreSQL, other database: raw, the INSERT and a checkpoint upsert in one transaction per page"
            }
            Kind::OursPg => {
                "PostgreSQL, other database: ours, `PostgresProjections::with_event_source` (`#[flush]`: one INSERT per batch)"
            }
            Kind::RawRedis => "Redis: raw keyset read + one pipeline of HINCRBY per page",
            Kind::RawRedisCheckpoint => {
                "Redis: raw, the page's HINCRBYs and a checkpoint SET in one MULTI/EXEC"
            }
            Kind::OursRedis => "Redis: ours, `RedisProjections` (WATCH + MULTI/EXEC per batch)",
        }
    }

    /// The raw contenders this one is compared with: (read + write, read + write + checkpoint).
    fn baselines(self) -> (Kind, Kind) {
        match self {
            Kind::RawPg | Kind::RawPgCheckpoint | Kind::OursPg => {
                (Kind::RawPg, Kind::RawPgCheckpoint)
            }
            Kind::RawRedis | Kind::RawRedisCheckpoint | Kind::OursRedis => {
                (Kind::RawRedis, Kind::RawRedisCheckpoint)
            }
        }
    }

    async fn run(self, events: &PostgresStore, read: &ReadDb) -> Result<u64, BenchError> {
        match self {
            Kind::RawPg => raw_pg(events, read, false).await,
            Kind::RawPgCheckpoint => raw_pg(events, read, true).await,
            Kind::OursPg => ours_pg(events, read).await,
            Kind::RawRedis => raw_redis(events, false).await,
            Kind::RawRedisCheckpoint => raw_redis(events, true).await,
            Kind::OursRedis => ours_redis(events).await,
        }
    }
}

/// Runs the read-model catch-up comparison.
pub async fn run(config: &Config) -> Result<Vec<Table>, BenchError> {
    let schema = db::schema_name("readmodels");
    let events = db::our_store(&config.url, &schema).await?;
    let seeding = Instant::now();
    seed(&events).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!("ANALYZE \"{schema}\".events")))
        .execute(events.pool())
        .await?;
    eprintln!(
        "   seeded {EVENTS} events in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    let read = ReadDb::create(&config.url).await?;
    PostgresProjections::with_event_source(Arc::new(events.clone()), read.store.clone())
        .migrate()
        .await?;
    let kinds = [
        Kind::RawPg,
        Kind::RawPgCheckpoint,
        Kind::OursPg,
        Kind::RawRedis,
        Kind::RawRedisCheckpoint,
        Kind::OursRedis,
    ];
    // One unmeasured pass of each warms the caches (and plans) for everyone.
    for kind in [Kind::RawPg, Kind::RawRedis] {
        kind.run(&events, &read).await?;
    }
    let rounds = config.rounds.max(2);
    let mut results: HashMap<Kind, Vec<f64>> = HashMap::new();
    for round in 0..rounds {
        let mut order = kinds.to_vec();
        order.rotate_left(round % kinds.len());
        for kind in order {
            let started = Instant::now();
            let seen = kind.run(&events, &read).await?;
            let r = seen as f64 / started.elapsed().as_secs_f64();
            if seen != EVENTS as u64 {
                return Err(format!("{} saw {seen} of {EVENTS} events", kind.label()).into());
            }
            eprintln!("   round {round}: {}: {r:.0} events/s", kind.label());
            results.entry(kind).or_default().push(r);
        }
    }
    read.drop().await?;
    db::drop_schema(events.pool(), &schema).await?;
    events.pool().close().await;

    let base = |k: Kind| results.get(&k).map(|v| median(v));
    let mut table = Table::new(
        format!("Read models in their own stores: catch-up over {EVENTS} events (events/s, higher is better)"),
        &[
            "reader → read model",
            "events/s",
            "vs raw read + write (same target)",
            "vs raw + checkpoint (same target)",
        ],
    );
    for kind in kinds {
        let empty = Vec::new();
        let v = results.get(&kind).unwrap_or(&empty);
        let (plain, with_checkpoint) = kind.baselines();
        table.row(vec![
            kind.label().to_owned(),
            rate(v),
            ratio(median(v), base(plain)),
            ratio(median(v), base(with_checkpoint)),
        ]);
    }
    table.note(format!(
        "{EVENTS} events ({STREAMS} streams) in a PostgresStore schema of the benchmark database; every contender reads all of them \
         from the start, {BATCH} per page, and writes one read-model update per event: a row `(event_id, account, amount)` in a fresh table of \
         another database on the same server (`{READ_SCHEMA}` schema of a database created for the run), or one `HINCRBY` of the account's balance \
         in one Redis hash under a fresh key prefix; each run's result is checked (row count, or the balances' number and sum) and removed. \
         The raw readers page by the events table's primary key `(tx, position)` without the visibility horizon (not gap-free) and select only the \
         columns the job needs; ours reads full events through the store's gap-free read and decodes them into typed events. \
         Ours commits each batch with its checkpoint (PostgreSQL: one transaction in the read database, checkpoint compare-and-set; \
         Redis: WATCH of the checkpoint key, MULTI/EXEC) and holds a lease (advisory lock / Redis key). Goal (issue: read models in their own stores): \
         ≥ 0.7× the raw read + raw write of the same rows, for both. Median of {rounds} rounds, the order rotating from round to round, after one \
         unmeasured pass of each raw reader."
    ));
    Ok(vec![table])
}
