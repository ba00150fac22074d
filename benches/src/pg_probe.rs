//! Where one command's time goes on PostgreSQL at 1 client (`--only pg-probe`): the pieces of a
//! W1 command measured one by one, each in a schema of its own, in interleaved blocks. Each piece
//! adds one layer to the one before it, so the differences are the layers' costs: our append
//! statement against the raw INSERT, the store's append path (alone, then through group commit),
//! the repository.

use cqrs_core::{EventStore, Repository};
use cqrs_postgres::PostgresStore;
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgPool, Postgres};
use sqlx::AssertSqlSafe;

use crate::domain::Account;
use crate::probe::{execute_nth, expected, nth_event, Probing, BLOCK, PER_STREAM};
use crate::report::Table;
use crate::{db, BenchError, Config};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Probe {
    RawInsert,
    OurStatement,
    StoreAlone,
    StoreGroup,
    Repository,
}

const PROBES: [Probe; 5] = [
    Probe::RawInsert,
    Probe::OurStatement,
    Probe::StoreAlone,
    Probe::StoreGroup,
    Probe::Repository,
];

impl Probe {
    fn label(self) -> &'static str {
        match self {
            Probe::RawInsert => "raw one INSERT of the event on a kept connection (the raw table)",
            Probe::OurStatement => {
                "our one-event append statement (version guard, `tx`, RETURNING), raw on a kept connection"
            }
            Probe::StoreAlone => "`PostgresStore::append` of one event, `without_group_commit`",
            Probe::StoreGroup => "`PostgresStore::append` of one event, defaults (group commit)",
            Probe::Repository => "`Repository::execute` with defaults (a W1 command)",
        }
    }
}

/// Our append statement for one event, not notifying, as the store prepares it (written out).
fn our_statement(schema: &str) -> String {
    let events = format!("\"{schema}\".events");
    format!(
        "INSERT INTO {events}
            (tx, stream_type, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
         SELECT GREATEST(pg_current_xact_id(), last.tx), $1, $2, COALESCE(last.stream_version, 0) + 1, $4, $5, $6, $7::json, $8::json
         FROM (SELECT 1) AS one LEFT JOIN LATERAL (
            SELECT stream_version, tx FROM {events}
            WHERE stream_type = $1 AND stream_id = $2
            ORDER BY stream_version DESC LIMIT 1
         ) AS last ON true
         WHERE CASE WHEN $3 >= 0 THEN COALESCE(last.stream_version, 0) = $3
                    WHEN $3 = -2 THEN COALESCE(last.stream_version, 0) > 0 ELSE true END
         RETURNING position, tx::text AS tx_text, stream_version"
    )
}

enum Live {
    Conn {
        conn: PoolConnection<Postgres>,
        sql: String,
    },
    Store(PostgresStore),
    Repository(Repository<Account>),
}

struct Running {
    probe: Probe,
    live: Live,
    pool: PgPool,
    schema: String,
}

async fn open(url: &str, probe: Probe) -> Result<Running, BenchError> {
    let schema = db::schema_name(&format!("pgprobe_{probe:?}"));
    let store = db::our_store(url, &schema).await?;
    let pool = store.pool().clone();
    let live = match probe {
        Probe::RawInsert => {
            let table = db::raw_table(&pool, &schema).await?;
            Live::Conn {
                conn: pool.acquire().await?,
                sql: crate::w1::insert_sql(&table),
            }
        }
        Probe::OurStatement => Live::Conn {
            conn: pool.acquire().await?,
            sql: our_statement(&schema),
        },
        Probe::StoreAlone => Live::Store(store.without_group_commit()),
        Probe::StoreGroup => Live::Store(store),
        Probe::Repository => Live::Repository(Repository::new(store)),
    };
    Ok(Running {
        probe,
        live,
        pool,
        schema,
    })
}

impl Probing for Running {
    type Probe = Probe;

    fn probe(&self) -> Probe {
        self.probe
    }

    async fn one(&mut self, n: u64) -> Result<(), BenchError> {
        let (stream, before, event) = nth_event(n);
        match &mut self.live {
            Live::Conn { conn, sql } if self.probe == Probe::RawInsert => {
                sqlx::query(AssertSqlSafe(sql.as_str()))
                    .bind(stream.stream_type())
                    .bind(stream.id())
                    .bind(i64::try_from(before + 1)?)
                    .bind(event.event_id.as_uuid())
                    .bind(&event.event_type)
                    .bind(i32::try_from(event.schema_version)?)
                    .bind(event.payload.to_string())
                    .execute(&mut **conn)
                    .await?;
            }
            Live::Conn { conn, sql } => {
                let rows = sqlx::query(AssertSqlSafe(sql.as_str()))
                    .bind(stream.stream_type())
                    .bind(stream.id())
                    .bind(i64::try_from(before)?)
                    .bind(event.event_id.as_uuid())
                    .bind(&event.event_type)
                    .bind(i32::try_from(event.schema_version)?)
                    .bind(event.payload.to_string())
                    .bind(serde_json::to_string(&event.metadata)?)
                    .fetch_all(&mut **conn)
                    .await?;
                if rows.len() != 1 {
                    return Err("our statement's guard refused".into());
                }
            }
            Live::Store(store) => {
                store.append(&stream, expected(before), vec![event]).await?;
            }
            Live::Repository(repo) => {
                execute_nth(repo, n).await?;
            }
        }
        Ok(())
    }

    async fn finish(self) -> Result<(), BenchError> {
        drop(self.live);
        db::drop_schema(&self.pool, &self.schema).await?;
        self.pool.close().await;
        Ok(())
    }
}

/// Runs every probe in blocks of [`BLOCK`] operations, taking turns block by block (the order
/// rotating; see [`crate::probe::time_blocks`]); the table shows the median block's mean time per
/// operation.
pub async fn run(config: &Config) -> Result<Vec<Table>, BenchError> {
    let (micros, blocks) = crate::probe::measure(&PROBES, config, |p| open(&config.url, p)).await?;
    let mut table = Table::new(
        "PostgreSQL: where a 1-client command's time goes (µs per operation, lower is better)",
        &["operation", "µs/op (median block)", "range", "ops/s"],
    );
    crate::probe::rows(&mut table, &PROBES, &micros, Probe::label);
    table.note(format!(
        "One client, each probe in a fresh schema of its own (our migrated tables; the raw INSERT into the raw \
         baselines' table), {BLOCK} operations per block, {blocks} blocks per probe taken in turns with the order \
         rotating; median block. The events go into streams of {PER_STREAM} (open, then deposits), as in W1."
    ));
    Ok(vec![table])
}
