//! Orders, read by different consumers from their own stores: the same event store feeds an order
//! lookup and a full-text search in a PostgreSQL read database, and a per-customer dashboard in
//! Redis. Each read model keeps its checkpoint where it lives (the read database's `checkpoints`
//! table, a Redis key), moved in the same transaction as its writes; the event store is only read.

use std::collections::BTreeMap;
use std::sync::Arc;

use cqrs_core::prelude::*;
use cqrs_core::projection;
use cqrs_core::subscription::ProjectionRunner;
use cqrs_postgres::{PostgresProjections, PostgresStore};
use cqrs_redis::{RedisBatch, RedisProjections};
use sqlx::postgres::PgConnection;
use sqlx::AssertSqlSafe;

use crate::orders::{ItemAdded, OrderCreated, OrderSubmitted};

type Error = Box<dyn std::error::Error + Send + Sync>;

/// For the support desk: one row per order, in `order_lookup` of the read database.
#[derive(Debug, Clone)]
pub struct OrderLookupTable {
    /// `"schema".order_lookup`.
    table: String,
}

#[projection(name = "order_lookup_table")]
impl OrderLookupTable {
    async fn on_created(
        &mut self,
        e: &OrderCreated,
        meta: &RecordedEvent,
        db: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (id, customer, items, total_cents, status) VALUES ($1, $2, 0, 0, 'open')",
            self.table
        )))
        .bind(meta.stream.id())
        .bind(&e.customer)
        .execute(db)
        .await?;
        Ok(())
    }

    async fn on_item(
        &mut self,
        e: &ItemAdded,
        meta: &RecordedEvent,
        db: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET items = items + $2, total_cents = total_cents + $3 WHERE id = $1",
            self.table
        )))
        .bind(meta.stream.id())
        .bind(i64::from(e.quantity))
        .bind(i64::from(e.quantity) * e.unit_price.cents)
        .execute(db)
        .await?;
        Ok(())
    }

    async fn on_submitted(
        &mut self,
        _: &OrderSubmitted,
        meta: &RecordedEvent,
        db: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE {} SET status = 'submitted' WHERE id = $1",
            self.table
        )))
        .bind(meta.stream.id())
        .execute(db)
        .await?;
        Ok(())
    }
}

/// For the storefront's search box: PostgreSQL full-text search over customer names, in
/// `order_search` of the read database.
#[derive(Debug, Clone)]
pub struct OrderTextSearch {
    /// `"schema".order_search`.
    table: String,
}

#[projection(name = "order_text_search")]
impl OrderTextSearch {
    async fn on_created(
        &mut self,
        e: &OrderCreated,
        meta: &RecordedEvent,
        db: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(AssertSqlSafe(format!(
            "INSERT INTO {} (id, customer_name, document) VALUES ($1, $2, to_tsvector('simple', $2))",
            self.table
        )))
        .bind(meta.stream.id())
        .bind(&e.customer_name)
        .execute(db)
        .await?;
        Ok(())
    }
}

/// Adds a submitted order to its customer's dashboard. The order's customer was recorded by an
/// earlier command (of this transaction or an earlier one): commands of an `EXEC` run in order, so
/// the script reads it, where a handler, which only queues, could not.
const ADD_SUBMITTED: &str = r"local customer = redis.call('HGET', KEYS[1], ARGV[1])
if customer then
    redis.call('HINCRBY', ARGV[3] .. customer, 'submitted', 1)
    redis.call('HINCRBY', ARGV[3] .. customer, 'revenue_cents', ARGV[2])
end
return 0";

/// For the account pages: per customer, orders created, submitted and revenue, in Redis hashes
/// `<prefix>dashboard:<customer>`.
#[derive(Debug, Clone, Default)]
pub struct CustomerDashboard;

#[projection(name = "customer_dashboard")]
impl CustomerDashboard {
    async fn on_created(
        &mut self,
        e: &OrderCreated,
        meta: &RecordedEvent,
        batch: &mut RedisBatch,
    ) -> Result<(), std::convert::Infallible> {
        let owners = batch.key("order-customer");
        let dashboard = batch.key(&format!("dashboard:{}", e.customer));
        batch
            .pipeline()
            .hset(owners, meta.stream.id(), &e.customer)
            .ignore();
        batch.pipeline().hincr(dashboard, "orders", 1).ignore();
        Ok(())
    }

    async fn on_submitted(
        &mut self,
        e: &OrderSubmitted,
        meta: &RecordedEvent,
        batch: &mut RedisBatch,
    ) -> Result<(), std::convert::Infallible> {
        let owners = batch.key("order-customer");
        let dashboards = batch.key("dashboard:");
        batch
            .pipeline()
            .cmd("EVAL")
            .arg(ADD_SUBMITTED)
            .arg(1)
            .arg(owners)
            .arg(meta.stream.id())
            .arg(e.total_cents)
            .arg(dashboards)
            .ignore();
        Ok(())
    }
}

/// What the read models answer about one run's orders.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadModelsReport {
    /// The lookup row of the run's first order: (customer, items, total cents, status).
    pub lookup: Option<(String, i64, i64, String)>,
    /// Orders whose customer name has a word starting with "grac" (full-text, prefix match).
    pub search_hits: Vec<String>,
    /// The dashboard of the first order's customer.
    pub dashboard: BTreeMap<String, i64>,
}

/// Catches the three read models up with every event in `events` (each from its own checkpoint)
/// and queries them for the orders of `run` (see [`crate::orders::demo`]). `read_database` is the
/// read models' PostgreSQL database (or a schema standing in for one); `redis` holds the
/// dashboards under `redis_prefix`.
pub async fn demo(
    events: PostgresStore,
    read_database: PostgresStore,
    redis: &str,
    redis_prefix: &str,
    run: &str,
    out: &mut impl std::io::Write,
) -> Result<ReadModelsReport, Error> {
    let events: Arc<dyn EventStore> = Arc::new(events);
    let sql = PostgresProjections::with_event_source(events.clone(), read_database.clone());
    sql.migrate().await?;
    let schema = format!("\"{}\"", read_database.schema());
    let (lookup_table, search_table) = (
        format!("{schema}.order_lookup"),
        format!("{schema}.order_search"),
    );
    sqlx::raw_sql(AssertSqlSafe(format!(
        "CREATE TABLE IF NOT EXISTS {lookup_table} (id text PRIMARY KEY, customer text NOT NULL,
             items bigint NOT NULL, total_cents bigint NOT NULL, status text NOT NULL);
         CREATE TABLE IF NOT EXISTS {search_table} (id text PRIMARY KEY,
             customer_name text NOT NULL, document tsvector NOT NULL);
         CREATE INDEX IF NOT EXISTS order_search_document ON {search_table} USING gin (document);"
    )))
    .execute(read_database.pool())
    .await?;
    let dashboard = RedisProjections::connect(events, redis)
        .await?
        .with_key_prefix(redis_prefix);

    let lookup = OrderLookupTable {
        table: lookup_table.clone(),
    };
    ProjectionRunner::new(lookup, sql.clone())
        .catch_up()
        .await?;
    let search = OrderTextSearch {
        table: search_table.clone(),
    };
    ProjectionRunner::new(search, sql).catch_up().await?;
    ProjectionRunner::new(CustomerDashboard, dashboard.clone())
        .catch_up()
        .await?;

    let first = format!("{run}-o1");
    let lookup: Option<(String, i64, i64, String)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT customer, items, total_cents, status FROM {lookup_table} WHERE id = $1"
    )))
    .bind(&first)
    .fetch_optional(read_database.pool())
    .await?;
    let search_hits: Vec<String> = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT id FROM {search_table} WHERE document @@ to_tsquery('simple', $1) AND id LIKE $2
         ORDER BY id"
    )))
    .bind("grac:*")
    .bind(format!("{run}-%"))
    .fetch_all(read_database.pool())
    .await?;
    let customer = lookup.as_ref().map(|l| l.0.clone()).unwrap_or_default();
    let mut conn = dashboard.connection().await?;
    let dashboard: BTreeMap<String, i64> = redis::cmd("HGETALL")
        .arg(format!("{redis_prefix}dashboard:{customer}"))
        .query_async(&mut conn)
        .await?;
    writeln!(out, "read database, lookup {first}: {lookup:?}")?;
    writeln!(out, "read database, full-text 'grac*': {search_hits:?}")?;
    writeln!(out, "redis, dashboard of {customer}: {dashboard:?}")?;
    Ok(ReadModelsReport {
        lookup,
        search_hits,
        dashboard,
    })
}
