//! W2: one command on a stream of 1,000 events, with and without snapshots; and loading that stream
//! alone. Ours vs cqrs-es, and the limit without snapshots: raw SQL reading the same rows and
//! decoding each payload's text straight into its typed event.

use std::time::Instant;

use cqrs_core::{
    Apply, EventStore, ExpectedVersion, Repository, SnapshotPolicy, StreamId, StreamVersion,
};
use cqrs_postgres::PostgresStore;
use sqlx::postgres::PgPool;

use crate::domain::{
    deposits, memo, opened, Account, AccountOpened, Cmd, MoneyDeposited, MoneyWithdrawn,
};
use crate::report::{median, ratio, Table};
use crate::{db, BenchError, Config};

/// Events in the stream before the measured commands.
pub const STREAM_LEN: usize = 1_000;
/// Snapshot interval for both frameworks.
pub const SNAPSHOT_EVERY: usize = 100;
const ID: &str = "big";

/// Set when cqrs-es's snapshot store loaded a wrong state (see `cqrs_es`).
static SNAPSHOT_BUG_SEEN: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn deposit(n: usize) -> Cmd {
    Cmd::Deposit {
        amount: 100,
        memo: memo(0, n),
    }
}

/// One variant, seeded and warmed up: the stream holds [`STREAM_LEN`] events.
enum Variant {
    Ours {
        repo: Repository<Account>,
        store: PostgresStore,
        schema: String,
    },
    #[cfg(feature = "peers")]
    CqrsEs {
        peer: Box<crate::peers::CqrsEs>,
        snapshots: bool,
    },
    /// The limit: one SELECT of the stream's rows, each payload's text decoded straight into its
    /// typed event and applied; a command then INSERTs its event (autocommit), like W1's
    /// read-and-insert baseline.
    Raw {
        pool: PgPool,
        schema: String,
        select: String,
        insert: String,
    },
}

impl Variant {
    /// Ours on a fresh schema: seeds `STREAM_LEN - 1` events; the unmeasured warm-up command
    /// makes it `STREAM_LEN` (and, with snapshots, crosses a multiple of `SNAPSHOT_EVERY`, so a
    /// snapshot at `STREAM_LEN` exists).
    async fn ours(url: &str, snapshots: bool) -> Result<Self, BenchError> {
        let schema = db::schema_name(if snapshots { "w2_ours_snap" } else { "w2_ours" });
        let store = db::our_store(url, &schema).await?;
        let stream = StreamId::new("account", ID);
        let mut events = vec![opened(0)];
        events.extend(deposits(0, 1, STREAM_LEN - 2));
        let mut version = 0;
        for chunk in events.chunks(500) {
            store
                .append(
                    &stream,
                    ExpectedVersion::Exact(StreamVersion::new(version)),
                    chunk.to_vec(),
                )
                .await?;
            version += chunk.len() as u64;
        }
        // Without the aggregate cache: W2 measures a command that has to load its stream (the
        // first command on an aggregate, or one the cache dropped), which the cache would skip
        // after the first repeat.
        let mut repo = Repository::<Account>::new(store.clone()).without_cache();
        if snapshots {
            repo = repo.with_snapshots(store.clone(), SnapshotPolicy::every(SNAPSHOT_EVERY as u64));
        }
        repo.execute(ID, &deposit(STREAM_LEN)).await?;
        Ok(Variant::Ours {
            repo,
            store,
            schema,
        })
    }

    /// cqrs-es on a fresh schema, seeded in its own format, likewise.
    #[cfg(feature = "peers")]
    async fn cqrs_es(url: &str, snapshots: bool) -> Result<Self, BenchError> {
        use crate::w1::Contender;
        let name = if snapshots {
            "w2_cqrses_snap"
        } else {
            "w2_cqrses"
        };
        let peer =
            crate::peers::CqrsEs::new(url, name, snapshots.then_some(SNAPSHOT_EVERY)).await?;
        peer.seed(ID, STREAM_LEN - 2).await?;
        peer.execute(ID, &deposit(STREAM_LEN)).await?;
        Ok(Variant::CqrsEs {
            peer: Box::new(peer),
            snapshots,
        })
    }

    /// The raw table on a fresh schema, seeded with the same events (one transaction), likewise.
    async fn raw(url: &str) -> Result<Self, BenchError> {
        let schema = db::schema_name("w2_raw");
        let pool = db::pool(url).await?;
        let table = db::raw_table(&pool, &schema).await?;
        let insert = format!(
            "INSERT INTO {table} (stream_type, stream_id, stream_version, event_id, event_type, schema_version, payload, metadata)
             VALUES ('account', $1, $2, $3, $4, $5, $6::json, '{{}}'::json)"
        );
        let mut events = vec![opened(0)];
        events.extend(deposits(0, 1, STREAM_LEN - 2));
        let mut tx = pool.begin().await?;
        for (version, event) in (1_i64..).zip(&events) {
            sqlx::query(sqlx::AssertSqlSafe(&*insert))
                .bind(ID)
                .bind(version)
                .bind(*event.event_id.as_uuid())
                .bind(&event.event_type)
                .bind(i32::try_from(event.schema_version)?)
                .bind(event.payload.to_string())
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        let variant = Variant::Raw {
            select: format!(
                "SELECT stream_version, event_type, payload::text FROM {table}
                 WHERE stream_type = 'account' AND stream_id = $1 ORDER BY stream_version"
            ),
            insert: crate::w1::insert_sql(&table),
            pool,
            schema,
        };
        variant.command(usize::MAX).await?;
        Ok(variant)
    }

    #[cfg(not(feature = "peers"))]
    async fn cqrs_es(_: &str, _: bool) -> Result<Self, BenchError> {
        Err("built without --features peers".into())
    }

    /// The `n`-th measured command (0-based; `usize::MAX` for the warm-up).
    async fn command(&self, n: usize) -> Result<(), BenchError> {
        let cmd = deposit(STREAM_LEN.wrapping_add(1).wrapping_add(n));
        match self {
            Variant::Ours { repo, .. } => {
                repo.execute(ID, &cmd).await?;
            }
            #[cfg(feature = "peers")]
            Variant::CqrsEs { peer, .. } => {
                use crate::w1::Contender;
                peer.execute(ID, &cmd).await?;
            }
            Variant::Raw {
                pool,
                select,
                insert,
                ..
            } => {
                let (account, version) = raw_load(pool, select).await?;
                cmd.validate(account.open)?;
                crate::w1::raw_insert(pool, insert, ID, version + 1, &cmd).await?;
            }
        }
        Ok(())
    }

    /// Loads the aggregate and checks it holds `deposits` deposits.
    async fn load(&self, deposits: usize) -> Result<(), BenchError> {
        match self {
            Variant::Ours { repo, .. } => {
                let loaded = repo.load(ID).await?;
                if loaded.state.deposits as usize != deposits {
                    return Err(format!("wrong state after load: {:?}", loaded.state).into());
                }
            }
            #[cfg(feature = "peers")]
            Variant::CqrsEs { peer, snapshots } => {
                let loaded = peer.load(ID).await? as usize;
                // cqrs-es 0.5's snapshot store applies the events of the command that takes the
                // snapshot twice (once in `EventSink::write`, again when building the snapshot),
                // so its snapshot state is off by that command's events. Accept exactly that,
                // and report it.
                let off_by = usize::from(*snapshots);
                if loaded != deposits && loaded != deposits + off_by {
                    return Err(
                        format!("cqrs-es loaded {loaded} deposits, expected {deposits}").into(),
                    );
                }
                if loaded != deposits {
                    SNAPSHOT_BUG_SEEN.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Variant::Raw { pool, select, .. } => {
                let (account, _) = raw_load(pool, select).await?;
                if account.deposits as usize != deposits {
                    return Err(format!("raw: wrong state after load: {account:?}").into());
                }
            }
        }
        Ok(())
    }

    async fn finish(self) -> Result<(), BenchError> {
        match self {
            Variant::Ours { store, schema, .. } => {
                db::drop_schema(store.pool(), &schema).await?;
                store.pool().close().await;
                Ok(())
            }
            #[cfg(feature = "peers")]
            Variant::CqrsEs { peer, .. } => {
                use crate::w1::Contender;
                (*peer).finish().await
            }
            Variant::Raw { pool, schema, .. } => {
                db::drop_schema(&pool, &schema).await?;
                pool.close().await;
                Ok(())
            }
        }
    }
}

/// The raw load: the stream's rows in one query, each payload decoded from its text straight into
/// its typed event and applied. The account and its version.
async fn raw_load(pool: &PgPool, select: &str) -> Result<(Account, i64), BenchError> {
    let rows: Vec<(i64, String, String)> = sqlx::query_as(sqlx::AssertSqlSafe(select))
        .bind(ID)
        .fetch_all(pool)
        .await?;
    let mut account = Account::default();
    let mut version = 0;
    for (v, event_type, payload) in rows {
        version = v;
        match event_type.as_str() {
            "AccountOpened" => account.apply(&serde_json::from_str::<AccountOpened>(&payload)?),
            "MoneyDeposited" => account.apply(&serde_json::from_str::<MoneyDeposited>(&payload)?),
            "MoneyWithdrawn" => account.apply(&serde_json::from_str::<MoneyWithdrawn>(&payload)?),
            other => return Err(format!("unexpected event type {other}").into()),
        }
    }
    Ok((account, version))
}

/// Who runs a variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ours,
    CqrsEs,
    Raw,
}

/// Runs W2.
pub async fn run(config: &Config) -> Result<Vec<Table>, BenchError> {
    let repeats = if config.quick { 20 } else { 50 };
    // (label, kind, snapshots) → samples
    let variants = [
        ("cqrs-es, no snapshots", Kind::CqrsEs, false),
        ("ours, no snapshots", Kind::Ours, false),
        ("raw SQL + typed decode, no snapshots", Kind::Raw, false),
        ("cqrs-es, snapshot every 100", Kind::CqrsEs, true),
        ("ours, snapshot every 100", Kind::Ours, true),
    ];
    let mut samples: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); variants.len()];
    let rounds = config.rounds.max(3);
    for _ in 0..rounds {
        // Every variant of the round set up at once, then timed operation by operation, taking
        // turns (rotating the order), so that noise on the machine hits them alike.
        let mut live = Vec::new();
        for (i, &(_, kind, snapshots)) in variants.iter().enumerate() {
            let variant = match kind {
                Kind::Ours => Variant::ours(&config.url, snapshots).await?,
                Kind::Raw => Variant::raw(&config.url).await?,
                Kind::CqrsEs if cfg!(feature = "peers") => {
                    Variant::cqrs_es(&config.url, snapshots).await?
                }
                Kind::CqrsEs => continue,
            };
            live.push((i, variant));
        }
        let mut seconds = vec![(0.0_f64, 0.0_f64); variants.len()];
        for n in 0..repeats {
            for k in 0..live.len() {
                let (i, variant) = &live[(n + k) % live.len()];
                let started = Instant::now();
                variant.command(n).await?;
                seconds[*i].0 += started.elapsed().as_secs_f64();
            }
        }
        for n in 0..repeats {
            for k in 0..live.len() {
                let (i, variant) = &live[(n + k) % live.len()];
                let started = Instant::now();
                variant.load(STREAM_LEN + repeats - 1).await?;
                seconds[*i].1 += started.elapsed().as_secs_f64();
            }
        }
        for (i, variant) in live {
            let (command, load) = (
                seconds[i].0 * 1e3 / repeats as f64,
                seconds[i].1 * 1e3 / repeats as f64,
            );
            eprintln!(
                "   {}: command {command:.2} ms, load {load:.2} ms",
                variants[i].0
            );
            samples[i].0.push(command);
            samples[i].1.push(load);
            variant.finish().await?;
        }
    }
    let mut table = Table::new(
        format!(
            "W2: one command on a {STREAM_LEN}-event stream (ms per operation, lower is better)"
        ),
        &[
            "variant",
            "execute one command (ms)",
            "commands/s",
            "vs cqrs-es (throughput)",
            "vs raw (throughput)",
            "load the aggregate only (ms)",
            "vs cqrs-es (speed)",
            "vs raw (speed)",
        ],
    );
    let medians: Vec<Option<(f64, f64)>> = samples
        .iter()
        .map(|(command, load)| (!command.is_empty()).then(|| (median(command), median(load))))
        .collect();
    let of = |kind: Kind, snapshots: bool| {
        variants
            .iter()
            .position(|&(_, k, s)| k == kind && s == snapshots)
            .and_then(|i| medians[i])
    };
    let raw = of(Kind::Raw, false);
    for (i, &(label, kind, snapshots)) in variants.iter().enumerate() {
        let Some((c, l)) = medians[i] else {
            let mut row = vec![
                label.to_owned(),
                "not measured: built without `--features peers`".to_owned(),
            ];
            row.resize(8, "–".to_owned());
            table.row(row);
            continue;
        };
        let peer = of(Kind::CqrsEs, snapshots);
        let versus = |baseline: Option<(f64, f64)>, pick: fn((f64, f64)) -> f64, own: f64| {
            ratio(1.0 / own, baseline.map(|b| 1.0 / pick(b)))
        };
        let (vs_peer_c, vs_peer_l) = match kind {
            Kind::CqrsEs => ("baseline".to_owned(), "baseline".to_owned()),
            _ => (versus(peer, |b| b.0, c), versus(peer, |b| b.1, l)),
        };
        let (vs_raw_c, vs_raw_l) = match kind {
            Kind::Raw => ("limit".to_owned(), "limit".to_owned()),
            _ => (versus(raw, |b| b.0, c), versus(raw, |b| b.1, l)),
        };
        table.row(vec![
            label.to_owned(),
            format!("{c:.2}"),
            format!("{:.0}", 1e3 / c),
            vs_peer_c,
            vs_raw_c,
            format!("{l:.2}"),
            vs_peer_l,
            vs_raw_l,
        ]);
    }
    table.note(format!(
        "The stream holds {} events (seeded directly in each framework's own format, then one unmeasured warm-up command), \
         the raw limit reading them with one SELECT and decoding each payload's text straight into its typed event; \
         then {repeats} sequential deposit commands are timed, then {repeats} loads, the variants of a round taking turns \
         operation by operation (rotating the order). Snapshots: both frameworks snapshot every \
         {SNAPSHOT_EVERY} events, so each measured command loads the snapshot at {STREAM_LEN} plus the events after it. \
         Median over {} round(s) of the per-operation mean.",
        STREAM_LEN,
        rounds
    ));
    if SNAPSHOT_BUG_SEEN.load(std::sync::atomic::Ordering::Relaxed) {
        table.note(
            "Correctness note: cqrs-es 0.5's snapshot store loaded one deposit too many (the event of the command that \
             took the snapshot is applied twice: once by `EventSink::write`, again when the snapshot is built). Its \
             snapshot timings are still reported; ours loaded the exact state in every run (checked).",
        );
    }
    Ok(vec![table])
}
