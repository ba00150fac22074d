//! cqrs-nats against raw async-nats on the nats-server at `NATS_URL` (default `127.0.0.1:4222`):
//! (a) the relay's throughput (the runner reading the log from PostgreSQL, publishing each batch
//! and committing its checkpoint) against raw publishing of the same messages with acks, batch by
//! batch of the same size (send the batch, then await every ack); (b) the end-to-end latency from
//! an append to the consumer's read model at a steady 1,000 events/s, beside the raw broker round
//! trip (a JetStream publish until its ack) at the same rate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use cqrs_core::subscription::{ProjectionRunner, RunnerConfig};
use cqrs_core::{projection, EventStore, EventTypes, NewEvent, Position, RecordedEvent, StreamId};
use cqrs_nats::{Consumer, ConsumerConfig, PublishStored, Relay, RelayConfig};
use cqrs_postgres::{PostgresProjections, PostgresStore};
use sqlx::postgres::PgConnection;
use tokio::task::JoinSet;

use crate::domain::{memo, MoneyDeposited};
use crate::report::{median, rate, ratio, Table};
use crate::{db, BenchError, Config};

mod breakdown;

/// Events per batch, for the relay (the runner's batch) and for raw publishing alike.
const BATCH: usize = 500;
/// Events per second of the latency run.
const RATE: u64 = 1_000;

fn nats_url() -> String {
    std::env::var("NATS_URL").unwrap_or_else(|_| "127.0.0.1:4222".to_owned())
}

fn fresh(what: &str) -> String {
    format!("{what}{}", uuid::Uuid::now_v7().simple())
}

fn deposit(account: usize, n: usize) -> Result<NewEvent, BenchError> {
    Ok(NewEvent::from_event(&MoneyDeposited {
        amount: 100,
        memo: memo(account, n),
    })?)
}

/// Appends `events` deposits over `streams` streams, one event per append, 8 writers; `runs`
/// events of a stream follow each other in the log before the next stream's (`1`: the streams
/// interleave event by event).
async fn seed(
    store: &PostgresStore,
    events: usize,
    streams: usize,
    runs: usize,
) -> Result<(), BenchError> {
    let order: Vec<usize> = (0..events)
        .map(|i| (i / runs) % streams)
        .collect::<Vec<_>>();
    let order = Arc::new(order);
    let mut tasks = JoinSet::new();
    for writer in 0..8 {
        let (store, order) = (store.clone(), Arc::clone(&order));
        tasks.spawn(async move {
            // Each writer owns the streams `s % 8 == writer`, so one stream's events keep their
            // order in the log.
            for (i, &s) in order.iter().enumerate() {
                if s % 8 != writer {
                    continue;
                }
                let stream = StreamId::new("account", format!("acc-{s:05}"));
                store
                    .append(
                        &stream,
                        cqrs_core::ExpectedVersion::Any,
                        vec![deposit(s, i)?],
                    )
                    .await?;
            }
            Ok::<_, BenchError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

async fn all_events(store: &PostgresStore) -> Result<Vec<RecordedEvent>, BenchError> {
    let mut events = Vec::new();
    let mut after = Position::START;
    loop {
        let page = store.read_all(after, EventTypes::All, 5_000).await?;
        let Some(last) = page.last() else {
            return Ok(events);
        };
        after = last.position;
        events.extend(page);
    }
}

async fn fresh_stream(js: &jetstream::Context, prefix: &str) -> Result<String, BenchError> {
    let name = fresh("B");
    js.create_stream(jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{prefix}.>")],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    Ok(name)
}

/// The relay: a runner catching up from the start of the log, events per second.
async fn relay_once(
    store: &PostgresStore,
    client: &async_nats::Client,
    events: usize,
) -> Result<f64, BenchError> {
    let js = jetstream::new(client.clone());
    let prefix = fresh("r");
    let name = fresh_stream(&js, &prefix).await?;
    let backend = Arc::new(PostgresProjections::new(store.clone()));
    let relay: Relay<PublishStored, PgConnection> =
        Relay::new(js.clone(), PublishStored, RelayConfig::new(&prefix));
    let config = RunnerConfig::builder().batch_size(BATCH).build()?;
    let started = Instant::now();
    ProjectionRunner::shared(relay, backend)
        .named(fresh("relay"))
        .with_config(config)
        .delivering()
        .catch_up()
        .await?;
    let elapsed = started.elapsed().as_secs_f64();
    let stored = js.get_stream(&name).await?.info().await?.state.messages;
    js.delete_stream(&name).await?;
    if stored != events as u64 {
        return Err(format!("the relay stored {stored} of {events} messages").into());
    }
    Ok(events as f64 / elapsed)
}

/// Reads nothing into anything: the runner's own cost (reading the log from PostgreSQL, the
/// checkpoint transaction per batch), the ceiling of any projection on this backend.
#[derive(Default)]
struct Noop;

#[projection(name = "noop")]
impl Noop {
    async fn any(&mut self, _: &RecordedEvent, _: &mut PgConnection) {}
}

/// The runner alone: a no-op projection catching up from the start of the log, events per
/// second.
async fn noop_once(store: &PostgresStore, events: usize) -> Result<f64, BenchError> {
    let backend = Arc::new(PostgresProjections::new(store.clone()));
    let config = RunnerConfig::builder().batch_size(BATCH).build()?;
    let started = Instant::now();
    ProjectionRunner::shared(Noop, backend)
        .named(fresh("noop"))
        .with_config(config)
        .catch_up()
        .await?;
    Ok(events as f64 / started.elapsed().as_secs_f64())
}

/// Per-batch milliseconds of one run: wall time, then the phases (see [`breakdown::Phases`]).
struct Breakdown {
    wall: f64,
    phases: Vec<f64>,
}

/// The relay of [`relay_once`] with every phase timed (one run, not part of the rounds).
async fn relay_breakdown(
    store: &PostgresStore,
    client: &async_nats::Client,
) -> Result<Breakdown, BenchError> {
    let js = jetstream::new(client.clone());
    let prefix = fresh("r");
    let name = fresh_stream(&js, &prefix).await?;
    let clock = breakdown::Clock::default();
    let backend = Arc::new(breakdown::TimedBackend::new(
        PostgresProjections::new(store.clone()),
        store.clone(),
        clock.clone(),
    ));
    let relay: Relay<PublishStored, PgConnection> =
        Relay::new(js.clone(), PublishStored, RelayConfig::new(&prefix));
    let config = RunnerConfig::builder().batch_size(BATCH).build()?;
    let started = Instant::now();
    ProjectionRunner::shared(breakdown::Timed::new(relay, clock.clone()), backend)
        .named(fresh("relay"))
        .with_config(config)
        .delivering()
        .catch_up()
        .await?;
    let wall = started.elapsed();
    js.delete_stream(&name).await?;
    let p = clock.take();
    let batches = f64::from(p.batches.max(1));
    let ms = |d: Duration| d.as_secs_f64() * 1000.0 / batches;
    Ok(Breakdown {
        wall: ms(wall),
        phases: vec![ms(p.read), ms(p.map), ms(p.delivered), ms(p.commit)],
    })
}

/// Raw publishing of [`raw_once`], its sending and its awaiting of acks timed apart.
async fn raw_breakdown(
    events: &[RecordedEvent],
    client: &async_nats::Client,
) -> Result<Breakdown, BenchError> {
    let js = jetstream::new(client.clone());
    let prefix = fresh("w");
    let name = fresh_stream(&js, &prefix).await?;
    let messages = raw_messages(events, &prefix)?;
    let (mut send, mut acks_awaited) = (Duration::ZERO, Duration::ZERO);
    let started = Instant::now();
    for batch in messages.chunks(BATCH) {
        let t = Instant::now();
        let mut acks = Vec::with_capacity(batch.len());
        for (subject, message) in batch {
            acks.push(js.send_publish(subject.clone(), message.clone()).await?);
        }
        let sent = Instant::now();
        send += sent - t;
        for ack in acks {
            ack.await?;
        }
        acks_awaited += sent.elapsed();
    }
    let wall = started.elapsed();
    js.delete_stream(&name).await?;
    let batches = messages.len().div_ceil(BATCH).max(1) as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1000.0 / batches;
    Ok(Breakdown {
        wall: ms(wall),
        phases: vec![ms(send), ms(acks_awaited)],
    })
}

/// The messages the relay makes of `events` (subject, headers, `Nats-Msg-Id`, the stored
/// payload), for raw publishing.
fn raw_messages(
    events: &[RecordedEvent],
    prefix: &str,
) -> Result<Vec<(String, PublishMessage)>, BenchError> {
    let config = RelayConfig::new(prefix);
    events
        .iter()
        .map(|e| {
            let headers = cqrs_nats::headers::for_event(e, &e.event_type, e.schema_version)?;
            // The stored text as it is, as the relay forwards it.
            let payload = e.payload.as_str().as_bytes().to_vec();
            Ok((
                config.subject(e, &e.event_type),
                PublishMessage::build()
                    .headers(headers)
                    .message_id(e.event_id.to_string())
                    .payload(payload.into()),
            ))
        })
        .collect()
}

/// Raw async-nats: the same messages (subject, headers, payload as the relay makes them), batch by
/// batch: every message of a batch sent, then every ack awaited. Events per second.
async fn raw_once(
    events: &[RecordedEvent],
    client: &async_nats::Client,
) -> Result<f64, BenchError> {
    let js = jetstream::new(client.clone());
    let prefix = fresh("w");
    let name = fresh_stream(&js, &prefix).await?;
    let messages = raw_messages(events, &prefix)?;
    let started = Instant::now();
    for batch in messages.chunks(BATCH) {
        let mut acks = Vec::with_capacity(batch.len());
        for (subject, message) in batch {
            acks.push(js.send_publish(subject.clone(), message.clone()).await?);
        }
        for ack in acks {
            ack.await?;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stored = js.get_stream(&name).await?.info().await?.state.messages;
    js.delete_stream(&name).await?;
    if stored != events.len() as u64 {
        return Err(format!(
            "raw publishing stored {stored} of {} messages",
            events.len()
        )
        .into());
    }
    Ok(events.len() as f64 / elapsed)
}

/// The consumer's read model for the latency run: when each event was applied.
#[derive(Default)]
struct Applied;

#[projection(name = "applied")]
impl Applied {
    async fn any(
        &mut self,
        event: &RecordedEvent,
        db: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        sqlx::query("INSERT INTO applied (event_id, applied_at) VALUES ($1, clock_timestamp())")
            .bind(*event.event_id.as_uuid())
            .execute(db)
            .await?;
        Ok(())
    }
}

/// Milliseconds at the `q` quantile of `sorted`.
fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Appends one event every millisecond for `seconds`, relayed and consumed into a read model in
/// the same database; latencies (ms) to the consumer's insert of each event's row from the start
/// of its append call and from the append's return (committed), each sorted, the first second
/// left out (warm-up); and from the append's return to JetStream's storing of its message (the
/// relay's part). Also the append rate reached.
async fn end_to_end_once(
    url: &str,
    client: &async_nats::Client,
    seconds: u64,
) -> Result<((Vec<f64>, Vec<f64>, Vec<f64>), f64), BenchError> {
    let schema = db::schema_name(&fresh("nats_latency"));
    let store = db::our_store(url, &schema).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TABLE \"{schema}\".applied (event_id uuid PRIMARY KEY, applied_at timestamptz NOT NULL)"
    )))
    .execute(store.pool())
    .await?;
    // The read model's connections resolve the unqualified `applied` in the test's schema.
    let options: sqlx::postgres::PgConnectOptions = url.parse()?;
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options.options([("search_path", schema.as_str())]))
        .await?;
    let read_store = PostgresStore::new(pool).with_schema(&schema)?;
    let projections = Arc::new(PostgresProjections::new(read_store));
    cqrs_nats::postgres::migrate(&projections).await?;

    let js = jetstream::new(client.clone());
    let prefix = fresh("l");
    let name = fresh_stream(&js, &prefix).await?;
    let relay: Relay<PublishStored, PgConnection> =
        Relay::new(js.clone(), PublishStored, RelayConfig::new(&prefix));
    let relaying =
        ProjectionRunner::shared(relay, Arc::new(PostgresProjections::new(store.clone())))
            .with_config(RunnerConfig::builder().batch_size(BATCH).build()?)
            .delivering()
            .spawn();
    let consuming = Consumer::new(
        client.clone(),
        Applied,
        Arc::clone(&projections),
        Arc::clone(&projections),
        ConsumerConfig::new(&name, fresh("c")).batch_size(BATCH),
    )
    .spawn();

    let total = (RATE * seconds) as usize;
    type Sent = (
        uuid::Uuid,
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
    );
    let sent: Arc<Mutex<Vec<Sent>>> = Arc::new(Mutex::new(Vec::with_capacity(total)));
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    for i in 0..total {
        tick.tick().await;
        let (store, sent) = (store.clone(), Arc::clone(&sent));
        tasks.spawn(async move {
            let event = deposit(i % 100, i)?;
            let id = *event.event_id.as_uuid();
            let at = chrono::Utc::now();
            let stream = StreamId::new("account", format!("acc-{:05}", i % 100));
            store
                .append(&stream, cqrs_core::ExpectedVersion::Any, vec![event])
                .await?;
            let committed = chrono::Utc::now();
            sent.lock()
                .map_err(|_| "poisoned")?
                .push((id, at, committed));
            Ok::<_, BenchError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let reached = total as f64 / started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (applied,): (i64,) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{schema}\".applied"
        )))
        .fetch_one(store.pool())
        .await?;
        if applied as usize >= total {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!("only {applied} of {total} events reached the read model").into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consuming.stop().await;
    relaying.stop().await;
    let applied: Vec<(uuid::Uuid, chrono::DateTime<chrono::Utc>)> =
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT event_id, applied_at FROM \"{schema}\".applied"
        )))
        .fetch_all(store.pool())
        .await?;
    let applied: HashMap<_, _> = applied.into_iter().collect();
    let mut sent = std::mem::take(&mut *sent.lock().map_err(|_| "poisoned")?);
    sent.sort_by_key(|(_, at, _)| *at);
    let warm = RATE as usize;
    let latencies = |from_return: bool| {
        let mut ms: Vec<f64> = sent
            .iter()
            .skip(warm)
            .filter_map(|(id, call, done)| {
                let start = if from_return { done } else { call };
                applied
                    .get(id)
                    .map(|applied| (*applied - *start).num_microseconds())
            })
            .map(|us| us.unwrap_or(i64::MAX) as f64 / 1000.0)
            .collect();
        ms.sort_by(f64::total_cmp);
        ms
    };
    // When JetStream stored each event (its message's timestamp, the same machine's clock):
    // splits the path at the broker, the relay's part before it.
    let mut stored_at: HashMap<uuid::Uuid, i128> = HashMap::new();
    let mut stream = js.get_stream(&name).await?;
    let last = stream.info().await?.state.last_sequence;
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await?;
        let id = message
            .headers
            .get(cqrs_nats::headers::EVENT_ID)
            .and_then(|v| v.as_str().parse::<uuid::Uuid>().ok());
        if let Some(id) = id {
            stored_at.insert(id, message.time.unix_timestamp_nanos());
        }
    }
    let mut relayed: Vec<f64> = sent
        .iter()
        .skip(warm)
        .filter_map(|(id, _, done)| {
            let stored = stored_at.get(id)?;
            let done = i128::from(done.timestamp_nanos_opt()?);
            Some((stored - done) as f64 / 1e6)
        })
        .collect();
    relayed.sort_by(f64::total_cmp);
    let latencies = (latencies(false), latencies(true), relayed);
    js.delete_stream(&name).await?;
    db::drop_schema(store.pool(), &schema).await?;
    Ok((latencies, reached))
}

/// The raw broker round trip at the same rate: each message's JetStream publish until its ack
/// (ms), sorted, the first second left out.
async fn round_trip_once(
    client: &async_nats::Client,
    seconds: u64,
) -> Result<Vec<f64>, BenchError> {
    let js = jetstream::new(client.clone());
    let prefix = fresh("t");
    let name = fresh_stream(&js, &prefix).await?;
    let total = (RATE * seconds) as usize;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
    let mut tasks = JoinSet::new();
    let payload = serde_json::to_vec(&MoneyDeposited {
        amount: 100,
        memo: memo(0, 0),
    })?;
    for i in 0..total {
        tick.tick().await;
        let (js, subject, payload) = (
            js.clone(),
            format!("{prefix}.account.MoneyDeposited"),
            payload.clone(),
        );
        tasks.spawn(async move {
            let started = Instant::now();
            let message = PublishMessage::build()
                .message_id(i.to_string())
                .payload(payload.into());
            js.send_publish(subject, message).await?.await?;
            Ok::<_, BenchError>((i, started.elapsed().as_secs_f64() * 1000.0))
        });
    }
    let mut latencies = Vec::with_capacity(total);
    while let Some(done) = tasks.join_next().await {
        let (i, ms) = done??;
        if i >= RATE as usize {
            latencies.push(ms);
        }
    }
    latencies.sort_by(f64::total_cmp);
    js.delete_stream(&name).await?;
    Ok(latencies)
}

/// Runs both parts; `--quick` uses fewer events and shorter latency runs.
pub async fn run(config: &Config) -> Result<Vec<Table>, BenchError> {
    let client = async_nats::connect(nats_url())
        .await
        .map_err(|e| format!("cannot reach nats-server at {}: {e}", nats_url()))?;

    // (a) Throughput, on two layouts of the same log size.
    let events = if config.quick { 5_000 } else { 20_000 };
    let mut throughput = Table::new(
        format!("NATS relay throughput ({events} events, batches of {BATCH})"),
        &[
            "log layout",
            "relay (events/s)",
            "raw async-nats (events/s)",
            "relay / raw",
            "runner alone, no-op projection (events/s)",
        ],
    );
    let mut phases = Table::new(
        format!("Where a batch's time goes (ms per batch of {BATCH}, one timed run per layout)"),
        &[
            "log layout",
            "contender",
            "wall",
            "runner's reads (head, read_all)",
            "hand-over (map, enqueue)",
            "delivery (hand-over to last ack)",
            "checkpoint commit",
        ],
    );
    for (layout, streams, runs) in [
        ("1,000 streams, interleaved event by event", 1_000, 1),
        (
            "100 streams, runs of 1,000 events of one stream",
            100,
            1_000,
        ),
    ] {
        let schema = db::schema_name(&fresh("nats_relay"));
        let store = db::our_store(&config.url, &schema).await?;
        seed(&store, events, streams, runs).await?;
        let log = all_events(&store).await?;
        let (mut ours, mut raw, mut ratios, mut noop) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..config.rounds {
            // Contenders take turns, the first one alternating.
            let (a, b) = if round % 2 == 0 {
                let a = relay_once(&store, &client, events).await?;
                (a, raw_once(&log, &client).await?)
            } else {
                let b = raw_once(&log, &client).await?;
                (relay_once(&store, &client, events).await?, b)
            };
            let c = noop_once(&store, events).await?;
            eprintln!(
                "   {layout}, round {round}: relay {a:.0}/s, raw {b:.0}/s, runner alone {c:.0}/s"
            );
            noop.push(c);
            ours.push(a);
            raw.push(b);
            ratios.push(a / b);
        }
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let timed_relay = relay_breakdown(&store, &client).await?;
        let timed_raw = raw_breakdown(&log, &client).await?;
        let cell = |v: f64| format!("{v:.2}");
        let mut row = vec![
            layout.to_owned(),
            "relay".to_owned(),
            cell(timed_relay.wall),
        ];
        row.extend(timed_relay.phases.iter().copied().map(cell));
        phases.row(row);
        phases.row(vec![
            layout.to_owned(),
            "raw".to_owned(),
            cell(timed_raw.wall),
            "–".to_owned(),
            format!("send {}", cell(timed_raw.phases[0])),
            format!(
                "send to last ack {}",
                cell(timed_raw.phases[0] + timed_raw.phases[1])
            ),
            "–".to_owned(),
        ]);
        throughput.row(vec![
            layout.to_owned(),
            rate(&ours),
            rate(&raw),
            format!(
                "{} ({lo:.2}–{hi:.2})",
                ratio(median(&ours), Some(median(&raw)))
            ),
            rate(&noop),
        ]);
        db::drop_schema(store.pool(), &schema).await?;
    }
    throughput.note(format!(
        "The relay: `ProjectionRunner::delivering().catch_up` of a `Relay<PublishStored>` on \
         `PostgresProjections` from the start of the log, batches of {BATCH} (read from PostgreSQL, \
         handed over to the relay's publisher while up to two earlier batches are acknowledged and \
         checkpointed, each checkpoint committed after its batch's last ack). The runner alone: the same catch-up with a no-op \
         projection, after both contenders in each round (its read and checkpoint cost, which the \
         relay pays on top of publishing). Raw: the same messages (subject, headers, `Nats-Msg-Id`, \
         payload), built before the clock starts, published with `send_publish` batch by batch of \
         {BATCH}, then every ack of the batch awaited. Each contender publishes into a fresh \
         JetStream stream (file storage) per round; rounds interleave the contenders. Median of \
         {} round(s) (range); the ratio is of the medians, its range of the per-round ratios.",
        config.rounds
    ));

    phases.note(
        "Per batch, summed over one run of each contender and divided by its batches; the relay's \
         phases overlap (the runner hands batch N+1 over while batch N's acks are awaited and its \
         checkpoint commits, and reads batch N+2 meanwhile), so they add up to more than the wall \
         time. Relay: the runner's reads of the log (`head` and `read_all`), the hand-over \
         (`Deliver::deliver`: mapping each event to its message, queueing the batch for the \
         publisher task), the delivery (from the hand-over until the batch's last ack), and the \
         checkpoint-only commit (`commit_batch` without events: BEGIN, compare-and-set, COMMIT). \
         Raw: sending the batch (`send_publish` calls), and from the first send to the batch's \
         last ack. Timed by wrappers around the store, the backend and the projection \
         (benches/src/nats/breakdown.rs).",
    );

    // (b) End-to-end latency at a steady rate.
    let seconds = if config.quick { 5 } else { 10 };
    let mut latency = Table::new(
        format!("NATS end-to-end latency at {RATE} events/s ({seconds} s per round)"),
        &["path", "p50 (ms)", "p99 (ms)", "rate reached (events/s)"],
    );
    let mut call = (Vec::new(), Vec::new());
    let mut commit = (Vec::new(), Vec::new());
    let mut raw_rt = (Vec::new(), Vec::new());
    let mut relay_part = (Vec::new(), Vec::new());
    let mut reached = Vec::new();
    for round in 0..config.rounds {
        let ((from_call, from_commit, relayed), rate_reached) =
            end_to_end_once(&config.url, &client, seconds).await?;
        let raw = round_trip_once(&client, seconds).await?;
        eprintln!(
            "   latency round {round}: read model p50/p99 {:.2}/{:.2} ms from the append call, \
             {:.2}/{:.2} ms from its commit ({:.2}/{:.2} ms to JetStream); raw round trip {:.2}/{:.2} ms; appends {rate_reached:.0}/s",
            quantile(&from_call, 0.5),
            quantile(&from_call, 0.99),
            quantile(&from_commit, 0.5),
            quantile(&from_commit, 0.99),
            quantile(&relayed, 0.5),
            quantile(&relayed, 0.99),
            quantile(&raw, 0.5),
            quantile(&raw, 0.99)
        );
        for (into, from) in [
            (&mut call, &from_call),
            (&mut commit, &from_commit),
            (&mut raw_rt, &raw),
            (&mut relay_part, &relayed),
        ] {
            into.0.push(quantile(from, 0.5));
            into.1.push(quantile(from, 0.99));
        }
        reached.push(rate_reached);
    }
    let ms = |values: &[f64]| {
        let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{:.2} ({lo:.2}–{hi:.2})", median(values))
    };
    latency.row(vec![
        "append call → relay → JetStream → consumer's read model (PostgreSQL)".to_owned(),
        ms(&call.0),
        ms(&call.1),
        rate(&reached),
    ]);
    latency.row(vec![
        "append committed → relay → JetStream → consumer's read model".to_owned(),
        ms(&commit.0),
        ms(&commit.1),
        "(same run)".to_owned(),
    ]);
    latency.row(vec![
        "of which: append committed → stored in JetStream (the relay's part)".to_owned(),
        ms(&relay_part.0),
        ms(&relay_part.1),
        "(same run)".to_owned(),
    ]);
    latency.row(vec![
        "raw JetStream publish → ack".to_owned(),
        ms(&raw_rt.0),
        ms(&raw_rt.1),
        "–".to_owned(),
    ]);
    latency.note(format!(
        "One deposit appended every {} µs over 100 streams (each append its own task), relayed by a \
         live delivering `Relay` runner (batches up to {BATCH}) into JetStream, consumed by a `Consumer` \
         (batches up to {BATCH}) into a table of the same PostgreSQL database. Latency: from just \
         before the append call, or from its return (the event committed), to the consumer's insert of the event's row \
         (`clock_timestamp()` inside its transaction, committed right after). The raw round trip: \
         one JetStream publish every {} µs, from the call to its ack. The first second of each \
         round is left out (warm-up). Median of {} round(s) (range).",
        1_000_000 / RATE,
        1_000_000 / RATE,
        config.rounds
    ));
    Ok(vec![throughput, phases, latency])
}
