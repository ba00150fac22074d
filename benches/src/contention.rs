//! W3, hot streams: 16 concurrent writers, each command going to one of 4 shared accounts or to the
//! writer's own (Zipf-like weights), a conflict retried at once by the writer. W4, growing streams:
//! 8 clients, 500 commands each on its own account; the rate at the end against the rate at the
//! start shows whether a command's cost grows with its stream.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use cqrs_core::{ExecuteError, Repository};
use tokio::task::JoinSet;

use crate::domain::{memo, Account, Cmd};
use crate::report::{median, rate, ratio, Table};
use crate::w1::{Contender, Ours};
use crate::{BenchError, Config};

/// What one attempt at a command came to.
pub enum Attempt {
    /// Decided and stored.
    Done,
    /// Another writer stored an event on the stream first: decide again.
    Conflict,
}

/// A contender whose concurrency conflicts can be told apart from failures, so the workload can
/// retry them (each framework's own conflict error).
pub trait Attempting: Contender {
    /// Executes `cmd` on account `id` once.
    fn attempt(
        &self,
        id: &str,
        cmd: &Cmd,
    ) -> impl Future<Output = Result<Attempt, BenchError>> + Send;
}

impl Attempting for Ours {
    async fn attempt(&self, id: &str, cmd: &Cmd) -> Result<Attempt, BenchError> {
        attempt_ours(&self.repo, id, cmd).await
    }
}

async fn attempt_ours(
    repo: &Repository<Account>,
    id: &str,
    cmd: &Cmd,
) -> Result<Attempt, BenchError> {
    match repo.execute(id, cmd).await {
        Ok(_) => Ok(Attempt::Done),
        Err(ExecuteError::Concurrency(_)) => Ok(Attempt::Conflict),
        Err(e) => Err(e.into()),
    }
}

/// Writers in W3.
const WRITERS: usize = 16;
/// Accounts every W3 writer shares.
const HOT: usize = 4;
/// Commands per W3 writer and round.
const W3_COMMANDS: usize = 100;
/// The most attempts one W3 command may take before the run is declared broken.
const MAX_ATTEMPTS: usize = 1_000;

/// The account of a W3 command: a writer's own account with weight 8, the hot ones with weights
/// 4, 2, 1, 1 (out of 16), drawn from a per-writer xorshift sequence so every contender gets the
/// same commands.
fn w3_target(round: usize, writer: usize, draw: &mut u64) -> String {
    *draw ^= *draw << 13;
    *draw ^= *draw >> 7;
    *draw ^= *draw << 17;
    match *draw % 16 {
        0..=7 => format!("w3-r{round}-own-{writer:02}"),
        8..=11 => format!("w3-r{round}-hot-0"),
        12..=13 => format!("w3-r{round}-hot-1"),
        14 => format!("w3-r{round}-hot-2"),
        _ => format!("w3-r{round}-hot-3"),
    }
}

/// Opens every account of round `round`, untimed.
async fn w3_open<C: Attempting>(contender: &C, round: usize) -> Result<(), BenchError> {
    let own = (0..WRITERS).map(|w| format!("w3-r{round}-own-{w:02}"));
    let hot = (0..HOT).map(|h| format!("w3-r{round}-hot-{h}"));
    for id in own.chain(hot) {
        let open = Cmd::Open {
            owner: "Owner".to_owned(),
        };
        contender.execute(&id, &open).await?;
    }
    Ok(())
}

/// One W3 round on `contender`: every writer's commands, concurrently. Returns the seconds it
/// took and the conflicts retried.
async fn w3_round<C: Attempting>(
    contender: &Arc<C>,
    round: usize,
) -> Result<(f64, usize), BenchError> {
    let started = Instant::now();
    let mut writers = JoinSet::new();
    for writer in 0..WRITERS {
        let contender = Arc::clone(contender);
        writers.spawn(async move {
            let mut draw = 0x9E37_79B9_7F4A_7C15_u64 ^ ((round * WRITERS + writer) as u64 + 1);
            let mut conflicts = 0;
            for n in 0..W3_COMMANDS {
                let id = w3_target(round, writer, &mut draw);
                let cmd = Cmd::Deposit {
                    amount: 100,
                    memo: memo(writer, n),
                };
                let mut attempts = 0;
                loop {
                    attempts += 1;
                    match contender.attempt(&id, &cmd).await? {
                        Attempt::Done => break,
                        Attempt::Conflict if attempts < MAX_ATTEMPTS => conflicts += 1,
                        Attempt::Conflict => {
                            return Err(format!("{id}: {attempts} conflicts in a row").into())
                        }
                    }
                }
            }
            Ok::<_, BenchError>(conflicts)
        });
    }
    let mut conflicts = 0;
    while let Some(done) = writers.join_next().await {
        conflicts += done??;
    }
    Ok((started.elapsed().as_secs_f64(), conflicts))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    #[cfg(feature = "peers")]
    CqrsEs,
    /// Neither the aggregate cache nor group commit.
    OursPlain,
    /// The defaults without group commit.
    OursNoGroup,
    /// The defaults.
    Ours,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            #[cfg(feature = "peers")]
            Kind::CqrsEs => "cqrs-es 0.5 + postgres-es 0.5",
            Kind::OursPlain => "ours, no cache, no group commit",
            Kind::OursNoGroup => "ours, aggregate cache only (`without_group_commit`)",
            Kind::Ours => "ours, defaults (group commit + aggregate cache)",
        }
    }

    async fn start(self, url: &str, name: &str) -> Result<Live, BenchError> {
        let name = format!("{name}_{self:?}");
        Ok(match self {
            #[cfg(feature = "peers")]
            Kind::CqrsEs => {
                Live::CqrsEs(Box::new(crate::peers::CqrsEs::new(url, &name, None).await?))
            }
            Kind::OursPlain => Live::Ours(Ours::new(url, &name, false, false).await?),
            Kind::OursNoGroup => Live::Ours(Ours::new(url, &name, true, false).await?),
            Kind::Ours => Live::Ours(Ours::new(url, &name, true, true).await?),
        })
    }
}

const KINDS: &[Kind] = &[
    #[cfg(feature = "peers")]
    Kind::CqrsEs,
    Kind::OursPlain,
    Kind::OursNoGroup,
    Kind::Ours,
];

/// A contender of any kind ([`Contender`]'s futures rule out `dyn`).
enum Live {
    #[cfg(feature = "peers")]
    CqrsEs(Box<crate::peers::CqrsEs>),
    Ours(Ours),
}

impl Contender for Live {
    async fn execute(&self, id: &str, cmd: &Cmd) -> Result<(), BenchError> {
        match self {
            #[cfg(feature = "peers")]
            Live::CqrsEs(c) => c.execute(id, cmd).await,
            Live::Ours(c) => c.execute(id, cmd).await,
        }
    }

    async fn stored_events(&self) -> Result<i64, BenchError> {
        match self {
            #[cfg(feature = "peers")]
            Live::CqrsEs(c) => c.stored_events().await,
            Live::Ours(c) => c.stored_events().await,
        }
    }

    async fn finish(self) -> Result<(), BenchError> {
        match self {
            #[cfg(feature = "peers")]
            Live::CqrsEs(c) => c.finish().await,
            Live::Ours(c) => c.finish().await,
        }
    }
}

impl Attempting for Live {
    async fn attempt(&self, id: &str, cmd: &Cmd) -> Result<Attempt, BenchError> {
        match self {
            #[cfg(feature = "peers")]
            Live::CqrsEs(c) => c.attempt(id, cmd).await,
            Live::Ours(c) => c.attempt(id, cmd).await,
        }
    }
}

/// Starts every kind on a schema of its own.
async fn start_all(config: &Config, name: &str) -> Result<Vec<(Kind, Arc<Live>)>, BenchError> {
    let mut live = Vec::with_capacity(KINDS.len());
    for &kind in KINDS {
        live.push((kind, Arc::new(kind.start(&config.url, name).await?)));
    }
    Ok(live)
}

/// Checks each contender stored `expected` events, then drops its schema.
async fn finish_all(live: Vec<(Kind, Arc<Live>)>, expected: usize) -> Result<(), BenchError> {
    for (kind, contender) in live {
        let stored = contender.stored_events().await?;
        if stored != expected as i64 {
            return Err(format!(
                "{}: expected {expected} stored events, found {stored}",
                kind.label()
            )
            .into());
        }
        let contender = Arc::into_inner(contender).ok_or("contender still shared")?;
        contender.finish().await?;
    }
    Ok(())
}

/// W3: every contender runs the same rounds, taking turns in an order that rotates per round.
pub async fn run_w3(config: &Config) -> Result<Vec<Table>, BenchError> {
    let live = start_all(config, "w3").await?;
    // An untimed round first (accounts of round `rounds`), so statements are prepared and planned.
    let rounds = config.rounds;
    for (_, contender) in &live {
        w3_open(contender.as_ref(), rounds).await?;
        w3_round(contender, rounds).await?;
    }
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); live.len()];
    let mut conflicts: Vec<usize> = vec![0; live.len()];
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..live.len()).collect();
        order.rotate_left(round % live.len());
        for i in order {
            let (kind, contender) = &live[i];
            w3_open(contender.as_ref(), round).await?;
            let (seconds, retried) = w3_round(contender, round).await?;
            let commands = WRITERS * W3_COMMANDS;
            eprintln!(
                "   round {round}: {}: {:.0} cmd/s, {retried} conflicts retried",
                kind.label(),
                commands as f64 / seconds
            );
            rates[i].push(commands as f64 / seconds);
            conflicts[i] += retried;
        }
    }
    let find = |k: Kind| live.iter().position(|(kind, _)| *kind == k);
    let baseline = |k: Kind| find(k).map(|i| median(&rates[i]));
    #[cfg(feature = "peers")]
    let cqrs_es = baseline(Kind::CqrsEs);
    #[cfg(not(feature = "peers"))]
    let cqrs_es = None::<f64>;
    let mut table = Table::new(
        "W3 hot streams: 16 writers, 4 shared accounts + 1 own each, conflicts retried (commands/s, higher is better)",
        &[
            "contender",
            "commands/s",
            "vs cqrs-es",
            "vs ours without group commit",
            "conflicts retried per command",
        ],
    );
    for (i, (kind, _)) in live.iter().enumerate() {
        table.row(vec![
            kind.label().to_owned(),
            rate(&rates[i]),
            ratio(median(&rates[i]), cqrs_es),
            ratio(median(&rates[i]), baseline(Kind::OursNoGroup)),
            format!(
                "{:.2}",
                conflicts[i] as f64 / (rounds * WRITERS * W3_COMMANDS) as f64
            ),
        ]);
    }
    if !cfg!(feature = "peers") {
        table.note("cqrs-es not measured: built without `--features peers`.");
    }
    table.note(format!(
        "{WRITERS} writers × {W3_COMMANDS} deposits per round; each deposit goes to the writer's own account \
         (weight 8/16) or to one of {HOT} shared accounts (weights 4, 2, 1, 1), the same draws for every contender; \
         a concurrency conflict is retried at once by the writer (each framework's own conflict error, no backoff). \
         Median of {rounds} round(s), range in parentheses, after an untimed round; contenders take turns, \
         the order rotating every round, each on its own schema and pool."
    ));
    let accounts = WRITERS + HOT;
    finish_all(live, (rounds + 1) * (accounts + WRITERS * W3_COMMANDS)).await?;
    Ok(vec![table])
}

/// Clients in W4, each on an account of its own.
const W4_CLIENTS: usize = 8;
/// Commands per W4 client (the open, then deposits).
const W4_COMMANDS: usize = 500;
/// Commands per client timed at the start and at the end.
const W4_WINDOW: usize = 50;

/// One W4 run: every client's commands on its own account; returns the rates (commands/s, all
/// clients) over the first and the last [`W4_WINDOW`] commands of each client.
async fn w4_round<C: Contender>(
    contender: &Arc<C>,
    round: usize,
) -> Result<(f64, f64), BenchError> {
    let mut clients = JoinSet::new();
    for client in 0..W4_CLIENTS {
        let contender = Arc::clone(contender);
        clients.spawn(async move {
            let id = format!("w4-r{round}-{client}");
            let mut first = 0.0;
            let mut window = Instant::now();
            for n in 0..W4_COMMANDS {
                if n == W4_COMMANDS - W4_WINDOW {
                    window = Instant::now();
                }
                let cmd = if n == 0 {
                    Cmd::Open {
                        owner: "Owner".to_owned(),
                    }
                } else {
                    Cmd::Deposit {
                        amount: 100,
                        memo: memo(client, n),
                    }
                };
                contender.execute(&id, &cmd).await?;
                if n + 1 == W4_WINDOW {
                    first = window.elapsed().as_secs_f64();
                }
            }
            Ok::<_, BenchError>((first, window.elapsed().as_secs_f64()))
        });
    }
    let (mut start, mut end) = (0.0, 0.0);
    while let Some(done) = clients.join_next().await {
        let (first, last) = done??;
        start += W4_WINDOW as f64 / first;
        end += W4_WINDOW as f64 / last;
    }
    Ok((start, end))
}

/// W4: each contender runs the whole workload in turn, the order rotating per round.
pub async fn run_w4(config: &Config) -> Result<Vec<Table>, BenchError> {
    let live = start_all(config, "w4").await?;
    let rounds = config.rounds;
    let mut starts: Vec<Vec<f64>> = vec![Vec::new(); live.len()];
    let mut ends: Vec<Vec<f64>> = vec![Vec::new(); live.len()];
    for round in 0..rounds {
        let mut order: Vec<usize> = (0..live.len()).collect();
        order.rotate_left(round % live.len());
        for i in order {
            let (kind, contender) = &live[i];
            let (start, end) = w4_round(contender, round).await?;
            eprintln!(
                "   round {round}: {}: {start:.0} cmd/s at the start, {end:.0} at the end",
                kind.label()
            );
            starts[i].push(start);
            ends[i].push(end);
        }
    }
    #[cfg(feature = "peers")]
    let cqrs_es_end = live
        .iter()
        .position(|(kind, _)| *kind == Kind::CqrsEs)
        .map(|i| median(&ends[i]));
    #[cfg(not(feature = "peers"))]
    let cqrs_es_end = None::<f64>;
    let mut table = Table::new(
        "W4 growing streams: 8 clients × 500 commands, each on its own account (commands/s, higher is better)",
        &[
            "contender",
            "first 50 commands",
            "last 50 commands",
            "end / start",
            "end vs cqrs-es end",
        ],
    );
    for (i, (kind, _)) in live.iter().enumerate() {
        table.row(vec![
            kind.label().to_owned(),
            rate(&starts[i]),
            rate(&ends[i]),
            format!("{:.2}", median(&ends[i]) / median(&starts[i])),
            ratio(median(&ends[i]), cqrs_es_end),
        ]);
    }
    if !cfg!(feature = "peers") {
        table.note("cqrs-es not measured: built without `--features peers`.");
    }
    table.note(format!(
        "{W4_CLIENTS} concurrent clients, each opening its own account and depositing into it until it holds \
         {W4_COMMANDS} events; a rate is the sum over clients of {W4_WINDOW} commands over the time that client \
         took for its first (last) {W4_WINDOW}. Median of {rounds} round(s), range in parentheses; the contenders \
         run one after the other, the order rotating every round, each on its own schema and pool. \
         Goal: the defaults' end within 20% of their start."
    ));
    finish_all(live, rounds * W4_CLIENTS * W4_COMMANDS).await?;
    Ok(vec![table])
}
