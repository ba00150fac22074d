//! Side-by-side benchmarks of this framework against raw SQL and (with `--features peers`) cqrs-es 0.5 +
//! postgres-es 0.5, on the PostgreSQL at `DATABASE_URL`. See BENCHMARKS.md at the repository root.
//!
//! ```text
//! cargo run -p benches --release --features peers -- --quick     # < 2 minutes
//! cargo run -p benches --release --features peers                # the full set
//! cargo run -p benches --release --features peers -- --only w1,dispatch
//! cargo run -p benches --release --features peers -- --only sqlite       # not in the default run
//! cargo run -p benches --release --features peers -- --only sqlite-w1 --clients 1   # SQLite W1 alone
//! cargo run -p benches --release -- --only sqlite-append                 # SQLite batch append alone
//! cargo run -p benches --release -- --only sqlite-probe                  # a 1-client command's parts
//! cargo run -p benches --release -- --only sqlite-append-probe           # a 1-client batch's parts
//! cargo run -p benches --release -- --only pg-probe                      # the same on PostgreSQL
//! cargo run -p benches --release --features peers -- --only readmodels   # needs Redis too
//! cargo run -p benches --release --features nats -- --only nats          # needs nats-server
//! ```
//!
//! Every figure is measured in the same run as its baseline and printed with the ratio to it. Each
//! contender gets its own fresh schema and a pool of the same size ([`db::POOL_SIZE`]).

mod append;
mod catchup;
mod contention;
mod db;
mod dispatch;
mod domain;
mod latency;
mod memory;
#[cfg(feature = "nats")]
mod nats;
#[cfg(feature = "peers")]
mod peers;
mod pg_probe;
mod probe;
mod raw_group;
mod readmodels;
mod report;
mod sqlite;
mod sqlite_append_probe;
mod sqlite_probe;
mod w1;
mod w2;

use std::time::Instant;

use report::Table;

/// How much work each benchmark does.
#[derive(Debug, Clone)]
pub struct Config {
    /// The PostgreSQL to run against.
    pub url: String,
    /// Quick mode: fewer repetitions and smaller data where the benchmark allows it.
    pub quick: bool,
    /// Repetitions of each measured figure (the table shows the median and the range).
    pub rounds: usize,
    /// `--clients`: the client counts of the SQLite W1 (default 1 and 8).
    pub clients: Option<Vec<usize>>,
}

const BENCHMARKS: &[&str] = &[
    "w1", "latency", "w2", "w3", "w4", "append", "catchup", "dispatch", "memory",
];

/// Run only when named in `--only`: the default run stays the PostgreSQL set above. `sqlite`:
/// cqrs-sqlite against raw sqlx on SQLite and sqlite-es (W1, batch append, catch-up, memory);
/// `readmodels`: catch-up of read models in Redis and in another PostgreSQL database; `nats`:
/// the cqrs-nats relay and consumer against raw async-nats (built with `--features nats`);
/// `sqlite-w1`, `sqlite-append`: the SQLite W1 or batch-append table alone; `sqlite-probe` and
/// `pg-probe`: where a 1-client command's time goes, on SQLite and on PostgreSQL;
/// `sqlite-append-probe`: where a 1-client 100-event batch append's time goes on SQLite.
const OPT_IN: &[&str] = &[
    "pg-probe",
    "sqlite",
    "sqlite-w1",
    "sqlite-append",
    "sqlite-probe",
    "sqlite-append-probe",
    "readmodels",
    "nats",
];

fn usage() -> ! {
    eprintln!(
        "usage: benches [--quick] [--rounds N] [--clients N,M] [--only {},{}]\n\
         (the last {} run only when named; --clients: the SQLite W1's client counts, default 1,8)\n\
         DATABASE_URL defaults to postgres://postgres@127.0.0.1:5432/test, REDIS_URL to redis://127.0.0.1:6379/",
        BENCHMARKS.join(","),
        OPT_IN.join(","),
        OPT_IN.len()
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(memory::CHILD_FLAG) {
        memory::child_main(&args[1..]);
        return;
    }
    let mut quick = false;
    let mut rounds = None;
    let mut clients: Option<Vec<usize>> = None;
    let mut only: Option<Vec<String>> = None;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--quick" => quick = true,
            "--rounds" => rounds = it.next().and_then(|n| n.parse().ok()).or_else(|| usage()),
            "--clients" => {
                clients = it
                    .next()
                    .and_then(|s| s.split(',').map(|n| n.parse().ok()).collect())
                    .filter(|c: &Vec<usize>| !c.is_empty() && !c.contains(&0))
                    .or_else(|| usage());
            }
            "--only" => {
                only = it
                    .next()
                    .map(|s| s.split(',').map(str::to_owned).collect())
                    .or_else(|| usage());
            }
            // `cargo bench` passes `--bench`; accept and ignore it.
            "--bench" => {}
            _ => usage(),
        }
    }
    if let Some(only) = &only {
        if let Some(bad) = only
            .iter()
            .find(|b| !BENCHMARKS.contains(&b.as_str()) && !OPT_IN.contains(&b.as_str()))
        {
            eprintln!("unknown benchmark `{bad}`");
            usage();
        }
    }
    let config = Config {
        url: std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
        quick,
        rounds: rounds.unwrap_or(if quick { 1 } else { 3 }).max(1),
        clients,
    };
    let selected = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|b| b == name));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("cannot start the tokio runtime: {e}")));
    let started = Instant::now();
    println!("{}", report::machine_summary(&config));
    let mut tables: Vec<Table> = Vec::new();
    runtime.block_on(async {
        if let Err(e) = db::check(&config.url).await {
            fail(&format!("cannot reach PostgreSQL at {}: {e}", config.url));
        }
        let opt_in = |name: &str| only.as_ref().is_some_and(|o| o.iter().any(|b| b == name));
        let names = BENCHMARKS
            .iter()
            .copied()
            .filter(|b| selected(b))
            .chain(OPT_IN.iter().copied().filter(|b| opt_in(b)));
        for name in names {
            let t = Instant::now();
            eprintln!("== {name}");
            let result = match name {
                "w1" => w1::run(&config).await,
                "latency" => latency::run(&config).await,
                "w2" => w2::run(&config).await,
                "w3" => contention::run_w3(&config).await,
                "w4" => contention::run_w4(&config).await,
                "append" => append::run(&config).await,
                "catchup" => catchup::run(&config).await,
                "dispatch" => Ok(dispatch::run(&config)),
                "memory" => memory::run(&config).await,
                "sqlite" => sqlite::run(&config).await,
                "sqlite-w1" => sqlite::run_w1(&config).await,
                "sqlite-append" => sqlite::run_append(&config).await,
                "sqlite-probe" => {
                    probe::on_a_worker(&config, |c| async move { sqlite_probe::run(&c).await })
                        .await
                }
                "sqlite-append-probe" => {
                    probe::on_a_worker(
                        &config,
                        |c| async move { sqlite_append_probe::run(&c).await },
                    )
                    .await
                }
                "pg-probe" => {
                    probe::on_a_worker(&config, |c| async move { pg_probe::run(&c).await }).await
                }
                "readmodels" => readmodels::run(&config).await,
                #[cfg(feature = "nats")]
                "nats" => nats::run(&config).await,
                #[cfg(not(feature = "nats"))]
                "nats" => Err("`--only nats` needs a build with `--features nats`".into()),
                _ => unreachable!("checked above"),
            };
            match result {
                Ok(mut t) => {
                    for table in &t {
                        println!("{table}");
                    }
                    tables.append(&mut t);
                }
                Err(e) => fail(&format!("benchmark `{name}` failed: {e}")),
            }
            eprintln!("   ({name} took {:.1} s)", t.elapsed().as_secs_f64());
        }
    });
    println!(
        "All benchmarks done in {:.1} s ({} tables).",
        started.elapsed().as_secs_f64(),
        tables.len()
    );
}

/// Prints `message` and exits with status 1.
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1)
}

/// The error type of the benchmarks: any failure aborts the run with its message.
pub type BenchError = Box<dyn std::error::Error + Send + Sync>;
