//! Where one command's time goes on SQLite at 1 client (`--only sqlite-probe`): the pieces of a
//! W1 command measured one by one, each on a file of its own, in interleaved blocks. Each piece
//! adds one layer to the one before it, so the differences are the layers' costs: a round trip to
//! sqlx's worker thread, a round trip to a Tokio task, the commit's flush, the writer's
//! statements, the store's writer, the repository.

use std::path::PathBuf;
use std::time::Duration;

use cqrs_core::{EventStore, Repository, StreamId};
use cqrs_sqlite::{SqliteConfig, SqliteStore, Synchronous};
use sqlx::sqlite::{SqliteConnection, SqliteSynchronous};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::{mpsc, oneshot};

use crate::domain::Account;
use crate::probe::{execute_nth, expected, nth_event, Probing, BLOCK, PER_STREAM};
use crate::report::Table;
use crate::sqlite::{remove_db, temp_db};
use crate::{BenchError, Config};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Probe {
    Task,
    Hop,
    InsertNormal,
    InsertFull,
    TxnNormal,
    TxnFull,
    FoldedNormal,
    FoldedFull,
    RusqliteNormal,
    RusqliteFull,
    AppendNormal,
    AppendFull,
    Repository,
}

const PROBES: [Probe; 13] = [
    Probe::Task,
    Probe::Hop,
    Probe::InsertNormal,
    Probe::InsertFull,
    Probe::TxnNormal,
    Probe::TxnFull,
    Probe::FoldedNormal,
    Probe::FoldedFull,
    Probe::RusqliteNormal,
    Probe::RusqliteFull,
    Probe::AppendNormal,
    Probe::AppendFull,
    Probe::Repository,
];

impl Probe {
    fn label(self) -> &'static str {
        match self {
            Probe::Task => "Tokio task round trip (mpsc to a task, oneshot back; no database)",
            Probe::Hop => "sqlx worker round trip (`SELECT 1` on one connection)",
            Probe::InsertNormal => "one autocommit INSERT of an event, `synchronous = NORMAL`",
            Probe::InsertFull => "one autocommit INSERT of an event, `synchronous = FULL`",
            Probe::TxnNormal => {
                "the writer's statements (BEGIN IMMEDIATE, version SELECT, INSERT, COMMIT), NORMAL"
            }
            Probe::TxnFull => {
                "the writer's statements (BEGIN IMMEDIATE, version SELECT, INSERT, COMMIT), FULL"
            }
            Probe::FoldedNormal => {
                "one autocommit INSERT … SELECT with the version guard folded in, NORMAL"
            }
            Probe::FoldedFull => {
                "one autocommit INSERT … SELECT with the version guard folded in, FULL"
            }
            Probe::RusqliteNormal => {
                "rusqlite on a thread of its own: the writer's 4 statements, one channel round trip, NORMAL"
            }
            Probe::RusqliteFull => {
                "rusqlite on a thread of its own: the writer's 4 statements, one channel round trip, FULL"
            }
            Probe::AppendNormal => "`SqliteStore::append` of one event, NORMAL",
            Probe::AppendFull => "`SqliteStore::append` of one event, FULL (the default)",
            Probe::Repository => "`Repository::execute` with the cache (a W1 command), FULL",
        }
    }
}

/// An insert of one event into the store's table (the statement the store prepares for a
/// one-event batch, written out).
const INSERT: &str = "INSERT INTO events (stream_type, stream_id, stream_version, event_id, \
     event_type, schema_version, payload, metadata, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)";

/// The insert with the expected-version check in it: inserts nothing when the stream is not at
/// version `?3`.
const FOLDED: &str = "INSERT INTO events (stream_type, stream_id, stream_version, event_id, \
     event_type, schema_version, payload, metadata, recorded_at) \
     SELECT ?1, ?2, cur.v + 1, ?4, ?5, ?6, ?7, ?8, ?9 FROM (SELECT coalesce(max(stream_version), 0) \
     AS v FROM (SELECT stream_version FROM events WHERE stream_type = ?1 AND stream_id = ?2 \
     ORDER BY stream_version DESC LIMIT 1)) AS cur WHERE cur.v = ?3";

const VERSION: &str = "SELECT coalesce(max(stream_version), 0) FROM events \
     WHERE stream_type = ?1 AND stream_id = ?2";

/// One append for the rusqlite thread: the stream, the event, where to answer.
type RusqliteJob = (
    StreamId,
    cqrs_core::NewEvent,
    oneshot::Sender<Result<(), String>>,
);

enum Live {
    Task(mpsc::Sender<oneshot::Sender<()>>),
    Rusqlite(std::sync::mpsc::Sender<RusqliteJob>),
    Conn(Box<SqliteConnection>),
    Store(SqliteStore),
    Repository(Repository<Account>),
}

struct Running {
    probe: Probe,
    live: Live,
    path: Option<PathBuf>,
}

async fn open(probe: Probe) -> Result<Running, BenchError> {
    if probe == Probe::Task {
        let (queue, mut requests) = mpsc::channel::<oneshot::Sender<()>>(16);
        tokio::spawn(async move {
            while let Some(reply) = requests.recv().await {
                let _ = reply.send(());
            }
        });
        return Ok(Running {
            probe,
            live: Live::Task(queue),
            path: None,
        });
    }
    let path = temp_db(&format!("probe_{probe:?}"))?;
    let synchronous = match probe {
        Probe::InsertNormal
        | Probe::TxnNormal
        | Probe::FoldedNormal
        | Probe::RusqliteNormal
        | Probe::AppendNormal => Synchronous::Normal,
        _ => Synchronous::Full,
    };
    // The store creates the schema; the raw probes write to its table on a connection of their own.
    let store = SqliteStore::open_with(
        SqliteConfig::builder(&path)
            .synchronous(synchronous)
            .build()?,
    )
    .await?;
    let live = match probe {
        Probe::RusqliteNormal | Probe::RusqliteFull => {
            store.close().await;
            drop(store);
            Live::Rusqlite(rusqlite_writer(&path, synchronous)?)
        }
        Probe::AppendNormal | Probe::AppendFull => Live::Store(store),
        Probe::Repository => Live::Repository(Repository::new(store)),
        _ => {
            store.close().await;
            drop(store);
            let synchronous = match synchronous {
                Synchronous::Normal => SqliteSynchronous::Normal,
                _ => SqliteSynchronous::Full,
            };
            let conn = crate::sqlite::raw_options(&path, synchronous)
                .connect()
                .await?;
            Live::Conn(Box::new(conn))
        }
    };
    Ok(Running {
        probe,
        live,
        path: Some(path),
    })
}

impl Probing for Running {
    type Probe = Probe;

    fn probe(&self) -> Probe {
        self.probe
    }

    async fn one(&mut self, n: u64) -> Result<(), BenchError> {
        let (stream, before, event) = nth_event(n);
        match (&mut self.live, self.probe) {
            (Live::Task(queue), _) => {
                let (reply, done) = oneshot::channel();
                queue.send(reply).await.map_err(|_| "task gone")?;
                done.await?;
            }
            (Live::Conn(conn), Probe::Hop) => {
                let one: i64 = sqlx::query_scalar("SELECT 1")
                    .fetch_one(&mut **conn)
                    .await?;
                std::hint::black_box(one);
            }
            (Live::Conn(conn), Probe::TxnNormal | Probe::TxnFull) => {
                sqlx::raw_sql("BEGIN IMMEDIATE")
                    .execute(&mut **conn)
                    .await?;
                let current: i64 = sqlx::query_scalar(VERSION)
                    .bind(stream.stream_type())
                    .bind(stream.id())
                    .fetch_one(&mut **conn)
                    .await?;
                insert(conn, &stream, current + 1, &event).await?;
                sqlx::raw_sql("COMMIT").execute(&mut **conn).await?;
            }
            (Live::Conn(conn), Probe::FoldedNormal | Probe::FoldedFull) => {
                let done = sqlx::query(FOLDED)
                    .bind(stream.stream_type())
                    .bind(stream.id())
                    .bind(i64::try_from(before)?)
                    .bind(event.event_id.as_uuid().as_bytes().as_slice())
                    .bind(&event.event_type)
                    .bind(i64::from(event.schema_version))
                    .bind(event.payload.to_string())
                    .bind(serde_json::to_string(&event.metadata)?)
                    .bind(chrono::Utc::now().timestamp_micros())
                    .execute(&mut **conn)
                    .await?;
                if done.rows_affected() != 1 {
                    return Err("the folded insert's guard failed".into());
                }
            }
            (Live::Rusqlite(jobs), _) => {
                let (reply, done) = oneshot::channel();
                jobs.send((stream, event, reply))
                    .map_err(|_| "rusqlite thread gone")?;
                done.await??;
            }
            (Live::Conn(conn), _) => {
                insert(conn, &stream, i64::try_from(before)? + 1, &event).await?;
            }
            (Live::Store(store), _) => {
                store.append(&stream, expected(before), vec![event]).await?;
            }
            (Live::Repository(repo), _) => {
                execute_nth(repo, n).await?;
            }
        }
        Ok(())
    }

    async fn finish(self) -> Result<(), BenchError> {
        match self.live {
            Live::Conn(conn) => conn.close().await?,
            Live::Store(store) => store.close().await,
            Live::Task(_) | Live::Repository(_) | Live::Rusqlite(_) => {}
        }
        if let Some(path) = self.path {
            remove_db(&path);
        }
        Ok(())
    }
}

async fn insert(
    conn: &mut SqliteConnection,
    stream: &StreamId,
    version: i64,
    event: &cqrs_core::NewEvent,
) -> Result<(), BenchError> {
    sqlx::query(INSERT)
        .bind(stream.stream_type())
        .bind(stream.id())
        .bind(version)
        .bind(event.event_id.as_uuid().as_bytes().as_slice())
        .bind(&event.event_type)
        .bind(i64::from(event.schema_version))
        .bind(event.payload.to_string())
        .bind(serde_json::to_string(&event.metadata)?)
        .bind(chrono::Utc::now().timestamp_micros())
        .execute(conn)
        .await?;
    Ok(())
}

/// A thread that owns a rusqlite connection and appends each job in `BEGIN IMMEDIATE`, the
/// version read, the insert and `COMMIT` (cached prepared statements), as the store's writer does.
fn rusqlite_writer(
    path: &std::path::Path,
    synchronous: Synchronous,
) -> Result<std::sync::mpsc::Sender<RusqliteJob>, BenchError> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.pragma_update(
        None,
        "synchronous",
        match synchronous {
            Synchronous::Normal => "NORMAL",
            _ => "FULL",
        },
    )?;
    let (jobs, queue) = std::sync::mpsc::channel::<RusqliteJob>();
    std::thread::spawn(move || {
        for (stream, event, reply) in queue {
            let outcome = (|| -> Result<(), rusqlite::Error> {
                conn.execute_batch("BEGIN IMMEDIATE")?;
                let current: i64 = conn
                    .prepare_cached(VERSION)?
                    .query_row((stream.stream_type(), stream.id()), |row| row.get(0))?;
                let metadata = serde_json::to_string(&event.metadata).unwrap_or_default();
                conn.prepare_cached(INSERT)?.execute(rusqlite::params![
                    stream.stream_type(),
                    stream.id(),
                    current + 1,
                    event.event_id.as_uuid().as_bytes().as_slice(),
                    event.event_type,
                    i64::from(event.schema_version),
                    event.payload.to_string(),
                    metadata,
                    chrono::Utc::now().timestamp_micros(),
                ])?;
                conn.execute_batch("COMMIT")?;
                Ok(())
            })();
            if outcome.is_err() {
                let _ = conn.execute_batch("ROLLBACK");
            }
            let _ = reply.send(outcome.map_err(|e| e.to_string()));
        }
    });
    Ok(jobs)
}

/// Runs every probe in blocks of [`BLOCK`] operations, taking turns block by block (the order
/// rotating; see [`crate::probe::time_blocks`]); the table shows the median block's mean time per
/// operation.
pub async fn run(config: &Config) -> Result<Vec<Table>, BenchError> {
    let (micros, blocks) = crate::probe::measure(&PROBES, config, open).await?;
    crate::sqlite::remove_temp_dir();
    let mut table = Table::new(
        "SQLite: where a 1-client command's time goes (µs per operation, lower is better)",
        &["operation", "µs/op (median block)", "range", "ops/s"],
    );
    crate::probe::rows(&mut table, &PROBES, &micros, Probe::label);
    table.note(format!(
        "One client, each probe on a fresh file of its own (the store's migrated schema; WAL), {BLOCK} operations per block, \
         {blocks} blocks per probe taken in turns with the order rotating; median block. The raw probes use one sqlx \
         connection of their own; the events go into streams of {PER_STREAM} (open, then deposits), as in W1."
    ));
    Ok(vec![table])
}
