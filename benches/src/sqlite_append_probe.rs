//! Where a 1-client 100-event batch append's time goes on SQLite (`--only sqlite-append-probe`):
//! the raw contender of the batch-append table, the same statement on a connection of its own,
//! statement shapes that check the expected version (the folded `INSERT … SELECT … ORDER BY` with
//! numbered and with anonymous parameters, a `VALUES` list whose first row reads the version, a
//! version read and a plain insert in a transaction) and `SqliteStore::append`, in interleaved
//! blocks on files of their own. `PROBE_ONLY=RawPool,Store` (the probes' names) runs a subset,
//! e.g. one probe at a time under `valgrind --tool=callgrind` for instruction counts.

use std::path::PathBuf;

use cqrs_core::{EventStore, NewEvent, StreamId};
use cqrs_sqlite::SqliteStore;
use sqlx::sqlite::{SqliteConnection, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection};

use crate::append::BATCH;
use crate::domain::deposits;
use crate::probe::Probing;
use crate::report::Table;
use crate::sqlite::{our_store, remove_db, temp_db};
use crate::{BenchError, Config};

/// Batches per timed block.
const BLOCK: usize = 20;
/// Batches per stream (streams of 1,000 events, as in the batch-append table).
const PER_STREAM: u64 = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Probe {
    RawPool,
    RawConn,
    GuardedConn,
    GuardedAnonConn,
    ExplicitConn,
    TxnConn,
    Store,
}

const PROBES: [Probe; 7] = [
    Probe::RawPool,
    Probe::RawConn,
    Probe::GuardedConn,
    Probe::GuardedAnonConn,
    Probe::ExplicitConn,
    Probe::TxnConn,
    Probe::Store,
];

impl Probe {
    fn label(self) -> &'static str {
        match self {
            Probe::RawPool => {
                "raw multi-row INSERT … VALUES on the store's pool (the table's raw contender)"
            }
            Probe::RawConn => "the same on a connection of its own",
            Probe::GuardedConn => {
                "the folded guard INSERT … SELECT … ORDER BY, `?NNN` parameters, own connection"
            }
            Probe::GuardedAnonConn => "the same with anonymous `?` parameters",
            Probe::ExplicitConn => {
                "INSERT … VALUES with the versions, the first row's read from the expected one"
            }
            Probe::TxnConn => "BEGIN IMMEDIATE, version SELECT, INSERT … VALUES, COMMIT",
            Probe::Store => "`SqliteStore::append`",
        }
    }
}

fn guarded_anon_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO events (stream_type, stream_id, stream_version, event_id, event_type, \
         schema_version, payload, metadata, recorded_at) \
         SELECT ?, ?, cur.v + b.column1, b.column2, b.column3, b.column4, b.column5, b.column6, ? \
         FROM (SELECT coalesce(max(stream_version), 0) AS v FROM events \
         WHERE stream_type = ? AND stream_id = ?) AS cur, (VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("({}, ?, ?, ?, ?, ?)", row + 1));
    }
    sql.push_str(
        ") AS b WHERE CASE ? WHEN 0 THEN 1 WHEN 1 THEN cur.v = 0 WHEN 2 THEN cur.v > 0 \
         ELSE cur.v = ? END ORDER BY b.column1",
    );
    sql
}

fn explicit_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO events (stream_type, stream_id, stream_version, event_id, event_type, \
         schema_version, payload, metadata, recorded_at) VALUES (?, ?, \
         (SELECT coalesce(max(stream_version), 0) + 1 FROM events WHERE stream_type = ? AND stream_id = ? HAVING coalesce(max(stream_version), 0) = ?), \
         ?, ?, ?, ?, ?, ?)",
    );
    for _ in 1..rows {
        sql.push_str(", (?, ?, ?, ?, ?, ?, ?, ?, ?)");
    }
    sql
}

fn guarded_sql(rows: usize, ordered: bool) -> String {
    let mut sql = String::from(
        "INSERT INTO events (stream_type, stream_id, stream_version, event_id, event_type, \
         schema_version, payload, metadata, recorded_at) \
         SELECT ?1, ?2, cur.v + b.column1, b.column2, b.column3, b.column4, b.column5, b.column6, ?3 \
         FROM (SELECT coalesce(max(stream_version), 0) AS v FROM events \
         WHERE stream_type = ?1 AND stream_id = ?2) AS cur, (VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        let p = 6 + 5 * row;
        sql.push_str(&format!(
            "({}, ?{p}, ?{}, ?{}, ?{}, ?{})",
            row + 1,
            p + 1,
            p + 2,
            p + 3,
            p + 4
        ));
    }
    sql.push_str(
        ") AS b WHERE CASE ?4 WHEN 0 THEN 1 WHEN 1 THEN cur.v = 0 WHEN 2 THEN cur.v > 0 \
         ELSE cur.v = ?5 END",
    );
    if ordered {
        sql.push_str(" ORDER BY b.column1");
    }
    sql
}

enum Live {
    Conn(Box<SqliteConnection>),
    Store(SqliteStore),
}

struct Running {
    probe: Probe,
    live: Live,
    sql: String,
    path: PathBuf,
    /// The current block's batches, built before it is timed.
    batches: Vec<Vec<NewEvent>>,
}

async fn open(probe: Probe) -> Result<Running, BenchError> {
    let path = temp_db(&format!("append_probe_{probe:?}"))?;
    let store = our_store(&path).await?;
    let live = match probe {
        Probe::RawPool | Probe::Store => Live::Store(store),
        _ => {
            store.close().await;
            drop(store);
            let conn = crate::sqlite::raw_options(&path, SqliteSynchronous::Full)
                .connect()
                .await?;
            Live::Conn(Box::new(conn))
        }
    };
    let sql = match probe {
        Probe::GuardedConn => guarded_sql(BATCH, true),
        Probe::GuardedAnonConn => guarded_anon_sql(BATCH),
        Probe::ExplicitConn => explicit_sql(BATCH),
        _ => crate::sqlite::raw_batch_sql(BATCH),
    };
    Ok(Running {
        probe,
        live,
        sql,
        path,
        batches: Vec::new(),
    })
}

type Query<'q> = sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments>;

/// Binds an event's own columns: id, type, schema version, payload, metadata.
fn bind_event<'q>(query: Query<'q>, event: &NewEvent) -> Result<Query<'q>, BenchError> {
    Ok(query
        .bind(event.event_id.as_uuid().as_bytes().to_vec())
        .bind(event.event_type.clone())
        .bind(i64::from(event.schema_version))
        .bind(event.payload.to_string())
        .bind(serde_json::to_string(&event.metadata)?))
}

/// Binds rows of the events table's nine columns, versions `after + 1`, `after + 2`, …
fn bind_rows<'q>(
    mut query: Query<'q>,
    stream: &StreamId,
    after: i64,
    events: &[NewEvent],
    recorded_at: i64,
) -> Result<Query<'q>, BenchError> {
    for (offset, event) in (1_i64..).zip(events) {
        query = query
            .bind(stream.stream_type().to_owned())
            .bind(stream.id().to_owned())
            .bind(after + offset);
        query = bind_event(query, event)?.bind(recorded_at);
    }
    Ok(query)
}

impl Probing for Running {
    type Probe = Probe;
    const BLOCK: usize = BLOCK;

    fn probe(&self) -> Probe {
        self.probe
    }

    fn prepare(&mut self, block: usize) {
        self.batches = (0..BLOCK)
            .rev()
            .map(|i| deposits(block * BLOCK + i, 0, BATCH))
            .collect();
    }

    async fn one(&mut self, n: u64) -> Result<(), BenchError> {
        let events = self.batches.pop().ok_or("a block has no batch left")?;
        let stream = StreamId::new("account", format!("probe-{:06}", n / PER_STREAM));
        let base = (n % PER_STREAM) * BATCH as u64;
        let recorded_at = chrono::Utc::now().timestamp_micros();
        match (&mut self.live, self.probe) {
            (Live::Store(store), Probe::Store) => {
                store
                    .append(&stream, crate::probe::expected(base), events)
                    .await?;
            }
            (Live::Conn(conn), Probe::GuardedConn | Probe::GuardedAnonConn) => {
                let mut query = sqlx::query(sqlx::AssertSqlSafe(self.sql.as_str()))
                    .bind(stream.stream_type().to_owned())
                    .bind(stream.id().to_owned())
                    .bind(recorded_at);
                if self.probe == Probe::GuardedAnonConn {
                    // Anonymous parameters: the version subquery's own stream parameters.
                    query = query
                        .bind(stream.stream_type().to_owned())
                        .bind(stream.id().to_owned());
                } else {
                    query = query.bind(3_i64).bind(i64::try_from(base)?);
                }
                for event in &events {
                    query = bind_event(query, event)?;
                }
                if self.probe == Probe::GuardedAnonConn {
                    query = query.bind(3_i64).bind(i64::try_from(base)?);
                }
                let done = query.execute(&mut **conn).await?;
                if done.rows_affected() != BATCH as u64 {
                    return Err("the guarded insert stored nothing".into());
                }
            }
            (Live::Conn(conn), Probe::ExplicitConn) => {
                let (first, rest) = events.split_first().ok_or("an empty batch")?;
                let query = sqlx::query(sqlx::AssertSqlSafe(self.sql.as_str()))
                    .bind(stream.stream_type().to_owned())
                    .bind(stream.id().to_owned())
                    .bind(stream.stream_type().to_owned())
                    .bind(stream.id().to_owned())
                    .bind(i64::try_from(base)?);
                let query = bind_event(query, first)?.bind(recorded_at);
                let query = bind_rows(query, &stream, i64::try_from(base)? + 1, rest, recorded_at)?;
                let done = query.execute(&mut **conn).await?;
                if done.rows_affected() != BATCH as u64 {
                    return Err("the explicit insert stored nothing".into());
                }
            }
            (Live::Conn(conn), Probe::TxnConn) => {
                sqlx::raw_sql("BEGIN IMMEDIATE")
                    .execute(&mut **conn)
                    .await?;
                let current: i64 = sqlx::query_scalar(
                    "SELECT coalesce(max(stream_version), 0) FROM events \
                     WHERE stream_type = ? AND stream_id = ?",
                )
                .bind(stream.stream_type())
                .bind(stream.id())
                .fetch_one(&mut **conn)
                .await?;
                if current != i64::try_from(base)? {
                    sqlx::raw_sql("ROLLBACK").execute(&mut **conn).await?;
                    return Err("the version moved".into());
                }
                let query = sqlx::query(sqlx::AssertSqlSafe(self.sql.as_str()));
                bind_rows(query, &stream, current, &events, recorded_at)?
                    .execute(&mut **conn)
                    .await?;
                sqlx::raw_sql("COMMIT").execute(&mut **conn).await?;
            }
            (live, Probe::RawPool | Probe::RawConn) => {
                let query = sqlx::query(sqlx::AssertSqlSafe(self.sql.as_str()));
                let query = bind_rows(query, &stream, i64::try_from(base)?, &events, recorded_at)?;
                match live {
                    Live::Store(store) => query.execute(store.pool()).await?,
                    Live::Conn(conn) => query.execute(&mut **conn).await?,
                };
            }
            (Live::Conn(_) | Live::Store(_), _) => return Err("no such probe".into()),
        }
        Ok(())
    }

    async fn finish(self) -> Result<(), BenchError> {
        match self.live {
            Live::Conn(conn) => conn.close().await?,
            Live::Store(store) => store.close().await,
        }
        remove_db(&self.path);
        Ok(())
    }
}

/// Runs every probe in blocks of [`BLOCK`] batches, taking turns block by block (the order
/// rotating), for `config.rounds` × 10 blocks each (2 with `--quick`); the table shows the
/// median block's mean time per batch.
pub async fn run(config: &Config) -> Result<Vec<Table>, BenchError> {
    let (micros, blocks) = crate::probe::measure(&PROBES, config, open).await?;
    crate::sqlite::remove_temp_dir();
    let mut table = Table::new(
        format!("SQLite: where a 1-client {BATCH}-event batch append's time goes (µs per batch, lower is better)"),
        &["operation", "µs/batch (median block)", "range", "batches/s"],
    );
    crate::probe::rows(&mut table, &PROBES, &micros, Probe::label);
    table.note(format!(
        "One client, each probe on a fresh file of its own (the store's migrated schema; WAL, `synchronous = FULL`), \
         {BLOCK} batches of {BATCH} per block, {blocks} blocks per probe taken in turns with the order rotating; median block. \
         Streams of {} events, as in the batch-append table; JSON rendering inside the timing for all probes.",
        PER_STREAM as usize * BATCH
    ));
    Ok(vec![table])
}
