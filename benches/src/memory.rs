//! Peak memory while loading one very long stream (goal: < 100 MB for 1M events). Each load runs in a
//! child process of this binary, which reports its resident set before the load (`VmRSS`) and its
//! high-water mark after it (`VmHWM`, from /proc/self/status).

use std::sync::Arc;
use std::time::Instant;

use cqrs_core::{EventStore, ExpectedVersion, Repository, StreamId, StreamVersion};

use crate::domain::{deposits, opened, Account};
use crate::report::Table;
use crate::{db, BenchError, Config};

/// The first argument that makes this binary a measuring child.
pub const CHILD_FLAG: &str = "--child-load";
const ID: &str = "huge";

/// `(VmRSS, VmHWM)` of this process in KiB.
fn rss_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// The child: `--child-load <url> <schema> <repository|collect> <events>`. Prints one line:
/// `RESULT <rss before KiB> <peak KiB> <seconds>`.
pub fn child_main(args: &[String]) {
    let [url, schema, mode, events] = args else {
        eprintln!("child: bad arguments {args:?}");
        std::process::exit(2);
    };
    let events: u64 = events.parse().unwrap_or(0);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| crate::fail(&format!("child runtime: {e}")));
    let result = runtime.block_on(async {
        let store: Arc<dyn EventStore> = if mode.starts_with("sqlite-") {
            // `url` is the file's path.
            Arc::new(crate::sqlite::our_store(std::path::Path::new(url)).await?)
        } else {
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(db::POOL_SIZE)
                .connect(url)
                .await?;
            Arc::new(cqrs_postgres::PostgresStore::new(pool).with_schema(schema)?)
        };
        let (before, _) = rss_kib();
        let started = Instant::now();
        let count = match mode.as_str() {
            "repository" | "sqlite-repository" => {
                let loaded = Repository::<Account>::from_arc(store).load(ID).await?;
                loaded.version.get()
            }
            "collect" | "sqlite-collect" => {
                let all = store
                    .read_stream(
                        &StreamId::new("account", ID),
                        StreamVersion::new(1),
                        usize::MAX,
                    )
                    .await?;
                all.len() as u64
            }
            other => return Err(format!("unknown mode {other}").into()),
        };
        let seconds = started.elapsed().as_secs_f64();
        if count != events {
            return Err(format!("loaded {count} of {events} events").into());
        }
        let (_, peak) = rss_kib();
        Ok::<_, BenchError>((before, peak, seconds))
    });
    match result {
        Ok((before, peak, seconds)) => println!("RESULT {before} {peak} {seconds}"),
        Err(e) => crate::fail(&format!("child load failed: {e}")),
    }
}

async fn child(
    url: &str,
    schema: &str,
    mode: &str,
    events: usize,
) -> Result<(u64, u64, f64), BenchError> {
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .args([CHILD_FLAG, url, schema, mode, &events.to_string()])
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| {
            format!(
                "child ({mode}) printed no result; stderr: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
    let parts: Vec<&str> = line.split_whitespace().collect();
    match parts.as_slice() {
        [before, peak, seconds] => Ok((before.parse()?, peak.parse()?, seconds.parse()?)),
        _ => Err(format!("bad child output {line}").into()),
    }
}

/// Appends `events` events to the one stream, 1,000 per append.
async fn seed(store: &dyn EventStore, events: usize) -> Result<(), BenchError> {
    let stream = StreamId::new("account", ID);
    let seeding = Instant::now();
    let mut version = 0_u64;
    while (version as usize) < events {
        let n = (events - version as usize).min(1_000);
        let batch = if version == 0 {
            let mut b = vec![opened(0)];
            b.extend(deposits(0, 1, n - 1));
            b
        } else {
            deposits(0, version as usize, n)
        };
        store
            .append(
                &stream,
                ExpectedVersion::Exact(StreamVersion::new(version)),
                batch,
            )
            .await?;
        version += n as u64;
    }
    eprintln!(
        "   seeded {events} events in {:.1} s",
        seeding.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Seeds one stream and measures loading it in child processes.
pub async fn run(config: &Config) -> Result<Vec<Table>, BenchError> {
    let events = if config.quick { 200_000 } else { 1_000_000 };
    let schema = db::schema_name("memory");
    let store = db::our_store(&config.url, &schema).await?;
    seed(&store, events).await?;
    let mut table = Table::new(
        format!("Loading one {events}-event stream: peak memory (lower is better)"),
        &[
            "how",
            "RSS before load (MB)",
            "peak RSS (MB)",
            "peak − before (MB)",
            "time (s)",
            "events/s",
        ],
    );
    let modes = [
        (
            "ours: `Repository::load` (pages of `DEFAULT_LOAD_BATCH_SIZE`, 4,096 events)",
            "repository",
        ),
        (
            "for contrast: one `read_stream` collecting the whole stream",
            "collect",
        ),
    ];
    for (label, mode) in modes {
        let (before, peak, seconds) = child(&config.url, &schema, mode, events).await?;
        let mb = |kib: u64| kib as f64 / 1024.0;
        eprintln!(
            "   {mode}: before {:.1} MB, peak {:.1} MB",
            mb(before),
            mb(peak)
        );
        table.row(vec![
            label.to_owned(),
            format!("{:.1}", mb(before)),
            format!("{:.1}", mb(peak)),
            format!("{:.1}", mb(peak.saturating_sub(before))),
            format!("{seconds:.1}"),
            format!("{:.0}", events as f64 / seconds),
        ]);
    }
    db::drop_schema(store.pool(), &schema).await?;
    store.pool().close().await;
    table.note(format!(
        "Each load runs in a fresh child process of the benchmark binary; peak is its VmHWM after the load, which \
         includes everything the process ever held (runtime, pool, allocator). Goal: peak < 100 MB for a 1M-event stream{}.",
        if config.quick {
            "; QUICK MODE used 200k events, run without `--quick` for 1M"
        } else {
            ""
        }
    ));
    Ok(vec![table])
}

/// The same measurement on SQLite: one stream in a fresh file of the temp directory, seeded
/// through `SqliteStore::append`, loaded by children that open the file with
/// `SqliteStore::open_with`.
pub async fn run_sqlite(config: &Config) -> Result<Table, BenchError> {
    let events = if config.quick { 200_000 } else { 1_000_000 };
    let path = crate::sqlite::temp_db("memory")?;
    let store = crate::sqlite::our_store(&path).await?;
    seed(&store, events).await?;
    // The children open the file themselves: close ours first, so its WAL is checkpointed.
    store.close().await;
    drop(store);
    let file = path.to_string_lossy().into_owned();
    let mut table = Table::new(
        format!("SQLite: loading one {events}-event stream, peak memory (lower is better)"),
        &[
            "how",
            "RSS before load (MB)",
            "peak RSS (MB)",
            "peak − before (MB)",
            "time (s)",
            "events/s",
        ],
    );
    let modes = [
        (
            "ours: `Repository::load` over `SqliteStore` (pages of `DEFAULT_LOAD_BATCH_SIZE`, 4,096 events)",
            "sqlite-repository",
        ),
        (
            "for contrast: one `read_stream` collecting the whole stream",
            "sqlite-collect",
        ),
    ];
    for (label, mode) in modes {
        let (before, peak, seconds) = child(&file, "-", mode, events).await?;
        let mb = |kib: u64| kib as f64 / 1024.0;
        eprintln!(
            "   {mode}: before {:.1} MB, peak {:.1} MB",
            mb(before),
            mb(peak)
        );
        table.row(vec![
            label.to_owned(),
            format!("{:.1}", mb(before)),
            format!("{:.1}", mb(peak)),
            format!("{:.1}", mb(peak.saturating_sub(before))),
            format!("{seconds:.1}"),
            format!("{:.0}", events as f64 / seconds),
        ]);
    }
    crate::sqlite::remove_db(&path);
    table.note(format!(
        "Each load runs in a fresh child process of the benchmark binary that opens the file with the store's \
         defaults ({} read connections); peak is its VmHWM after the load, which includes everything the process ever \
         held (runtime, connections, SQLite's page caches, allocator). Goal: peak < 100 MB for a 1M-event stream{}.",
        crate::db::POOL_SIZE,
        if config.quick {
            "; QUICK MODE used 200k events, run without `--quick` for 1M"
        } else {
            ""
        }
    ));
    Ok(table)
}
