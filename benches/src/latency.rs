//! One single-event append, end to end from one client: `PostgresStore::append` against the raw
//! INSERT of the same row, into our table and into the minimal raw table. The three alternate
//! append by append on the same pool, so drift on the machine hits them alike. This separates what
//! the store adds per append (the guard's lookup of the stream's last event, the returned
//! position, encoding, the occasional notification) from what the schema costs (W1 compares
//! against the minimal table).

use std::time::Instant;

use cqrs_core::{EventStore, ExpectedVersion, Metadata, NewEvent, StreamId, StreamVersion};
use sqlx::postgres::PgPool;
use uuid::Uuid;

use crate::domain::deposits;
use crate::report::{median, ratio, Table};
use crate::{db, BenchError, Config};

/// Streams appended to round-robin (each grows by one event per round).
const STREAMS: usize = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ours,
    RawSameTable,
    RawMinimalTable,
}

const KINDS: [Kind; 3] = [Kind::Ours, Kind::RawSameTable, Kind::RawMinimalTable];

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Ours => "ours: `PostgresStore::append`, one event, `Exact` version",
            Kind::RawSameTable => "raw sqlx INSERT … VALUES into our table (same indexes)",
            Kind::RawMinimalTable => "raw sqlx INSERT … VALUES into the minimal raw table",
        }
    }
}

fn insert_sql(table: &str) -> String {
    format!(
        "INSERT INTO {table} (stream_type, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
         VALUES ($1, $2, $3, $4, $5, $6, $7::json, $8::json)"
    )
}

/// The event of the `round`-th append to stream `s`, stamped as a command's would be.
fn event(s: usize, round: usize) -> Result<NewEvent, BenchError> {
    let mut event = deposits(s, round, 1)
        .pop()
        .ok_or("deposits(…, 1) returned no event")?;
    event.metadata = Metadata {
        correlation_id: Some(Uuid::now_v7()),
        causation_id: Some(Uuid::now_v7()),
        ..Metadata::default()
    };
    Ok(event)
}

async fn raw_insert(
    pool: &PgPool,
    sql: &str,
    stream: &StreamId,
    version: u64,
    event: &NewEvent,
) -> Result<(), BenchError> {
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(stream.stream_type())
        .bind(stream.id())
        .bind(i64::try_from(version)?)
        .bind(event.event_id.as_uuid())
        .bind(&event.event_type)
        .bind(i32::try_from(event.schema_version)?)
        .bind(event.payload.to_string())
        .bind(serde_json::to_string(&event.metadata)?)
        .execute(pool)
        .await?;
    Ok(())
}

/// Runs the benchmark: microseconds per append, median and mean.
pub async fn run(config: &Config) -> Result<Vec<Table>, BenchError> {
    let rounds = if config.quick { 4 } else { 12 };
    let ours_schema = db::schema_name("latency_ours");
    let raw_schema = db::schema_name("latency_raw");
    let store = db::our_store(&config.url, &ours_schema).await?;
    let pool = store.pool().clone();
    let minimal = db::raw_table(&pool, &raw_schema).await?;
    let same = insert_sql(&format!("\"{ours_schema}\".events"));
    let minimal = insert_sql(&minimal);
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); KINDS.len()];
    // Round 0 is the warm-up: every connection prepares and plans its statements.
    for round in 0..=rounds {
        for s in 0..STREAMS {
            for (k, &kind) in KINDS.iter().enumerate() {
                let stream = StreamId::new("account", format!("{kind:?}-{s}"));
                let event = event(s, round)?;
                let version = round as u64;
                let started = Instant::now();
                match kind {
                    Kind::Ours => {
                        store
                            .append(
                                &stream,
                                ExpectedVersion::Exact(StreamVersion::new(version)),
                                vec![event],
                            )
                            .await?;
                    }
                    Kind::RawSameTable => {
                        raw_insert(&pool, &same, &stream, version + 1, &event).await?;
                    }
                    Kind::RawMinimalTable => {
                        raw_insert(&pool, &minimal, &stream, version + 1, &event).await?;
                    }
                }
                if round > 0 {
                    samples[k].push(started.elapsed().as_secs_f64() * 1e6);
                }
            }
        }
    }
    db::drop_schema(&pool, &ours_schema).await?;
    db::drop_schema(&pool, &raw_schema).await?;
    pool.close().await;

    let medians: Vec<f64> = samples.iter().map(|v| median(v)).collect();
    let mut table = Table::new(
        "Single-event append latency, 1 client (µs per append, lower is better)",
        &[
            "contender",
            "median (µs)",
            "mean (µs)",
            "ours time / this time (median)",
        ],
    );
    for (k, &kind) in KINDS.iter().enumerate() {
        let v = &samples[k];
        let mean = v.iter().sum::<f64>() / v.len().max(1) as f64;
        table.row(vec![
            kind.label().to_owned(),
            format!("{:.0}", medians[k]),
            format!("{mean:.0}"),
            ratio(medians[0], Some(medians[k])),
        ]);
    }
    table.note(format!(
        "{STREAMS} streams × {rounds} rounds = {} appends per contender, after one untimed warm-up round; the three \
         alternate append by append on one pool of {} connections, each append in its own implicit transaction (so \
         each pays a commit, WAL flush included). The raw INSERTs write the same row, metadata included, with the \
         version the client already knows; ours reads the stream's last version in the statement (the guard that \
         makes `Exact` safe) and returns the position.",
        STREAMS * rounds,
        db::POOL_SIZE
    ));
    Ok(vec![table])
}
