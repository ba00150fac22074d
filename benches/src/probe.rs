//! The timing loop the `*-probe` benchmarks share: each probe's operation, in blocks taken in
//! turns, the order rotating, so that the machine's noise hits every probe alike.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

use cqrs_core::{ExpectedVersion, NewEvent, Repository, StreamId, StreamVersion};

use crate::domain::{deposits, opened, w1_command, Account};
use crate::report::{median, Table};
use crate::{BenchError, Config};

/// Operations per timed block.
pub const BLOCK: usize = 200;

/// One probe, open and ready to time.
#[allow(async_fn_in_trait)] // awaited in place, never spawned
pub trait Probing {
    /// Which probe this is.
    type Probe: Copy + Eq + Hash;

    /// Operations per timed block.
    const BLOCK: usize = BLOCK;

    fn probe(&self) -> Self::Probe;

    /// Untimed, before the warm-up (`block` 0) and before each timed block (`block` 1, 2, …):
    /// prepares what the block's operations need.
    fn prepare(&mut self, block: usize) {
        let _ = block;
    }

    /// The probe's `n`-th operation (0, 1, 2, … over the warm-up and every block).
    async fn one(&mut self, n: u64) -> Result<(), BenchError>;

    /// Closes what the probe opened.
    async fn finish(self) -> Result<(), BenchError>
    where
        Self: Sized;
}

/// Opens each probe of `all` that [`selected`] picks, times them all ([`time_blocks`]) and
/// closes them: the microseconds per operation of every block, per probe, and the number of
/// blocks.
pub async fn measure<R, F, Fut>(
    all: &[R::Probe],
    config: &Config,
    open: F,
) -> Result<(HashMap<R::Probe, Vec<f64>>, usize), BenchError>
where
    R: Probing,
    R::Probe: std::fmt::Debug,
    F: Fn(R::Probe) -> Fut,
    Fut: std::future::Future<Output = Result<R, BenchError>>,
{
    let mut running = Vec::new();
    for probe in selected(all) {
        running.push(open(probe).await?);
    }
    let measured = time_blocks(&mut running, config).await?;
    for r in running {
        r.finish().await?;
    }
    Ok(measured)
}

/// A row per measured probe of `all`, in that order, labelled by `label`.
pub fn rows<P: Copy + Eq + Hash>(
    table: &mut Table,
    all: &[P],
    micros: &HashMap<P, Vec<f64>>,
    label: impl Fn(P) -> &'static str,
) {
    for probe in all {
        if let Some(values) = micros.get(probe) {
            row(table, label(*probe), values);
        }
    }
}

/// Warms every probe up (a quarter block, untimed: prepared statements, caches), then times
/// `config.rounds` × 10 blocks of each (2 with `--quick`), in turns; returns the microseconds per
/// operation of every block, per probe, and the number of blocks.
pub async fn time_blocks<R: Probing>(
    running: &mut [R],
    config: &Config,
) -> Result<(HashMap<R::Probe, Vec<f64>>, usize), BenchError> {
    // Each probe's operations so far: the next one's number.
    let mut done = vec![0_u64; running.len()];
    for (r, done) in running.iter_mut().zip(&mut done) {
        r.prepare(0);
        for _ in 0..R::BLOCK / 4 {
            r.one(*done).await?;
            *done += 1;
        }
    }
    let blocks = config.rounds * if config.quick { 2 } else { 10 };
    let mut micros: HashMap<R::Probe, Vec<f64>> = HashMap::new();
    for block in 0..blocks {
        for k in 0..running.len() {
            let i = (block + k) % running.len();
            let r = &mut running[i];
            r.prepare(block + 1);
            let started = Instant::now();
            for _ in 0..R::BLOCK {
                r.one(done[i]).await?;
                done[i] += 1;
            }
            let per_op = started.elapsed().as_secs_f64() * 1e6 / R::BLOCK as f64;
            micros.entry(r.probe()).or_default().push(per_op);
        }
    }
    Ok((micros, blocks))
}

/// A probe table's row: the label, the median block's microseconds per operation, the range and
/// the rate.
fn row(table: &mut Table, label: &str, micros: &[f64]) {
    let m = median(micros);
    let (lo, hi) = micros
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    table.row(vec![
        label.to_owned(),
        format!("{m:.0}"),
        format!("{lo:.0}–{hi:.0}"),
        format!("{:.0}", 1e6 / m),
    ]);
}

/// Events per stream before the next stream starts (W1's commands per account).
pub const PER_STREAM: u64 = 10;

/// The `n`-th operation's stream, how many events it holds before, and the event to append (an
/// opening, then deposits), as in W1.
pub fn nth_event(n: u64) -> (StreamId, u64, NewEvent) {
    let stream = StreamId::new("account", format!("probe-{:06}", n / PER_STREAM));
    let before = n % PER_STREAM;
    let event = if before == 0 {
        opened(n as usize)
    } else {
        deposits(n as usize, before as usize, 1).remove(0)
    };
    (stream, before, event)
}

/// The expectation of an append to a stream that holds `before` events.
pub fn expected(before: u64) -> ExpectedVersion {
    if before == 0 {
        ExpectedVersion::NoStream
    } else {
        ExpectedVersion::Exact(StreamVersion::new(before))
    }
}

/// Executes the `n`-th W1 command, on the stream of [`nth_event`]`(n)`.
pub async fn execute_nth(repo: &Repository<Account>, n: u64) -> Result<(), BenchError> {
    let account = usize::try_from(n / PER_STREAM)?;
    let command = w1_command(account, usize::try_from(n % PER_STREAM)?);
    repo.execute(&format!("probe-{account:06}"), &command)
        .await?;
    Ok(())
}

/// The probes to run: all of `all`, or those `PROBE_ONLY` names (comma-separated, as their
/// `Debug` names), so that one probe can run alone under a profiler.
pub fn selected<P: Copy + std::fmt::Debug>(all: &[P]) -> Vec<P> {
    let only: Option<Vec<String>> = std::env::var("PROBE_ONLY")
        .ok()
        .map(|s| s.split(',').map(str::to_owned).collect());
    all.iter()
        .copied()
        .filter(|p| only.as_ref().is_none_or(|o| o.contains(&format!("{p:?}"))))
        .collect()
}

/// Runs a probe set on one of the runtime's worker threads, where a service's requests run: a
/// reply from the database wakes a task there differently (and at another cost) than the thread
/// that blocks on the runtime.
pub async fn on_a_worker<F, Fut>(config: &Config, run: F) -> Result<Vec<Table>, BenchError>
where
    F: FnOnce(Config) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Table>, BenchError>> + Send + 'static,
{
    tokio::spawn(run(config.clone())).await?
}
