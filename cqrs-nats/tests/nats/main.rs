//! The relay and the consumer against a real nats-server (the shared one at 127.0.0.1:4222, or
//! a private one for tests that stop the broker) and PostgreSQL (`DATABASE_URL`).
// Tests: failing assertions panic by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod broker;
mod faults;

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use cqrs_core::prelude::*;
use cqrs_core::subscription::{FailureCause, ProjectionRunner, RunnerConfig};
use cqrs_core::{EventStore, NewEvent, Projection};
use cqrs_nats::{
    ensure_stream, Consumer, ConsumerConfig, ConsumerState, PublishStored, Relay, RelayConfig,
};
use cqrs_postgres::{PostgresProjections, PostgresStore};
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

#[event(name = "Pinged")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Pinged {
    n: i64,
}

fn unique() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

async fn fresh_store() -> PostgresStore {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let store = PostgresStore::connect(&url)
        .await
        .expect("PostgreSQL at DATABASE_URL")
        .with_schema(&format!("nats_{}", unique()))
        .unwrap();
    store.migrate().await.unwrap();
    store
}

async fn drop_schema(store: &PostgresStore) {
    let statement = format!("DROP SCHEMA \"{}\" CASCADE", store.schema());
    sqlx::query(sqlx::AssertSqlSafe(statement))
        .execute(store.pool())
        .await
        .unwrap();
}

async fn append(store: &PostgresStore, from: i64, to: i64) {
    append_over(store, from, to, 5).await;
}

/// Appends events `from..to` round-robin over `streams` streams `p0`, `p1`, ...
async fn append_over(store: &PostgresStore, from: i64, to: i64, streams: i64) {
    for n in from..to {
        let event = NewEvent::from_event(&Pinged { n }).unwrap();
        store
            .append(
                &StreamId::new("pinger", format!("p{}", n % streams)),
                ExpectedVersion::Any,
                vec![event],
            )
            .await
            .unwrap();
    }
}

fn fast() -> RunnerConfig {
    RunnerConfig::builder()
        .batch_size(50)
        .poll_interval(Duration::from_millis(50))
        .initial_backoff(Duration::from_millis(50))
        .max_backoff(Duration::from_millis(300))
        .standby_interval(Duration::from_millis(50))
        .build()
        .unwrap()
}

type PgRelay = Relay<PublishStored, PgConnection>;

fn relay(client: &async_nats::Client, prefix: &str) -> PgRelay {
    let jetstream = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client.clone());
    Relay::new(jetstream, PublishStored, RelayConfig::new(prefix))
}

/// The consumer's read model: one row per applied event.
#[derive(Default)]
struct Received;

#[cqrs_core::projection(name = "received")]
impl Received {
    async fn any(
        &mut self,
        event: &RecordedEvent,
        db: &mut PgConnection,
    ) -> Result<(), sqlx::Error> {
        let _: Pinged = event.decode().map_err(|e| sqlx::Error::Decode(e.into()))?;
        sqlx::query("INSERT INTO received (event_id, stream_id, version) VALUES ($1, $2, $3)")
            .bind(*event.event_id.as_uuid())
            .bind(event.stream.id())
            .bind(i64::try_from(event.stream_version.get()).unwrap())
            .execute(db)
            .await?;
        Ok(())
    }
}

async fn received(store: &PostgresStore) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(DISTINCT event_id) FROM received")
        .fetch_one(store.pool())
        .await
        .unwrap()
}

/// Each origin stream's versions in the order the consumer applied them: `1..=n` for every
/// stream when nothing was lost, repeated or reordered.
async fn applied_in_order(store: &PostgresStore) -> std::collections::BTreeMap<String, Vec<i64>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT stream_id, version FROM received ORDER BY applied")
            .fetch_all(store.pool())
            .await
            .unwrap();
    let mut streams = std::collections::BTreeMap::<String, Vec<i64>>::new();
    for (stream, version) in rows {
        streams.entry(stream).or_default().push(version);
    }
    streams
}

/// Each origin stream's versions in the order the JetStream stream `name` stores them.
async fn stored_in_order(
    js: &jetstream::Context,
    name: &str,
) -> std::collections::BTreeMap<String, Vec<i64>> {
    let mut stream = js.get_stream(name).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut streams = std::collections::BTreeMap::<String, Vec<i64>>::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let header = |name: &str| message.headers.get(name).unwrap().as_str().to_owned();
        streams
            .entry(header(cqrs_nats::headers::STREAM_ID))
            .or_default()
            .push(header(cqrs_nats::headers::STREAM_VERSION).parse().unwrap());
    }
    streams
}

/// The events `append(store, 0, n)` wrote, per stream: versions `1..=n / 5` of `p0`..`p4`.
fn appended(n: i64) -> std::collections::BTreeMap<String, Vec<i64>> {
    appended_over(n, 5)
}

/// The events `append_over(store, 0, n, streams)` wrote, per stream.
fn appended_over(n: i64, streams: i64) -> std::collections::BTreeMap<String, Vec<i64>> {
    (0..streams)
        .map(|p| (format!("p{p}"), (1..=n / streams).collect()))
        .collect()
}

/// The event ids the JetStream stream `name` holds, in its order.
async fn stored_ids(js: &jetstream::Context, name: &str) -> Vec<String> {
    let mut stream = js.get_stream(name).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let mut ids = Vec::new();
    for sequence in 1..=last {
        let message = stream.get_raw_message(sequence).await.unwrap();
        let id = message.headers.get(cqrs_nats::headers::EVENT_ID).unwrap();
        ids.push(id.as_str().to_owned());
    }
    ids
}

/// The ids of the log's events, in log order.
async fn log_ids(store: &PostgresStore) -> Vec<String> {
    store
        .read_all(Position::START, cqrs_core::EventTypes::All, 100_000)
        .await
        .unwrap()
        .iter()
        .map(|e| e.event_id.to_string())
        .collect()
}

fn consumer(
    client: &async_nats::Client,
    backend: &Arc<PostgresProjections>,
    stream: &str,
) -> Consumer<Received, PostgresProjections, PostgresProjections> {
    let config = ConsumerConfig::new(stream, format!("c{}", unique()))
        .batch_size(40)
        .backoff(Duration::from_millis(50), Duration::from_millis(300));
    Consumer::new(
        client.clone(),
        Received,
        Arc::clone(backend),
        Arc::clone(backend),
        config,
    )
}

async fn consumer_schema(store: &PostgresStore) -> Arc<PostgresProjections> {
    let statement = format!(
        "CREATE TABLE \"{}\".received (
             applied bigserial PRIMARY KEY,
             event_id uuid NOT NULL,
             stream_id text NOT NULL,
             version bigint NOT NULL
         )",
        store.schema()
    );
    sqlx::query(sqlx::AssertSqlSafe(statement))
        .execute(store.pool())
        .await
        .unwrap();
    // Unqualified `received` in the handler resolves to the test's schema.
    let projections = PostgresProjections::new(store.clone());
    cqrs_nats::postgres::migrate(&projections).await.unwrap();
    Arc::new(projections)
}

/// A store whose connections search the test's schema first (for the handler's `received`).
async fn store_with_search_path() -> PostgresStore {
    let store = fresh_store().await;
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let options: sqlx::postgres::PgConnectOptions = url.parse().unwrap();
    let options = options.options([("search_path", store.schema())]);
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await
        .unwrap();
    PostgresStore::new(pool)
        .with_schema(store.schema())
        .unwrap()
}

/// A crash after a batch was published but before its checkpoint committed, then a relay killed
/// at a random moment: the restarted relay republishes, JetStream's duplicate window drops the
/// repeats (no message stored twice), and the consumer applies every event exactly once, also a
/// copy republished under a new message id (beyond the window), dropped by its event id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_killed_mid_batch_loses_and_duplicates_nothing() {
    let seed: u64 = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| u64::from(uuid::Uuid::now_v7().as_fields().1) % 200);
    println!("seed (kill delay in ms): {seed}");
    let store = store_with_search_path().await;
    let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let js = jetstream::new(client.clone());
    let (name, prefix) = (format!("T{}", unique()), format!("t{}", unique()));
    ensure_stream(
        &js,
        &name,
        vec![format!("{prefix}.>")],
        Duration::from_secs(120),
    )
    .await
    .unwrap();
    append(&store, 0, 300).await;
    let backend = Arc::new(PostgresProjections::new(store.clone()));

    // Crash between publish and checkpoint: the first 80 events published, nothing committed.
    let first: Vec<RecordedEvent> = store
        .read_all(Position::START, cqrs_core::EventTypes::All, 80)
        .await
        .unwrap();
    let mut crashed = relay(&client, &prefix);
    let mut conn = store.pool().acquire().await.unwrap();
    for event in &first {
        crashed.handle(event, &mut conn).await.unwrap();
    }
    crashed.flush(&mut conn).await.unwrap();
    drop(crashed);

    // Killed at a random moment.
    let killed = ProjectionRunner::shared(relay(&client, &prefix), Arc::clone(&backend))
        .with_config(fast())
        .delivering()
        .spawn();
    tokio::time::sleep(Duration::from_millis(seed)).await;
    killed.abort();

    let head = store.committed_head().await.unwrap().unwrap();
    let running = ProjectionRunner::shared(relay(&client, &prefix), Arc::clone(&backend))
        .with_config(fast())
        .delivering()
        .spawn();
    running
        .wait_for(head, Duration::from_secs(20))
        .await
        .unwrap();
    let mut stream = js.get_stream(&name).await.unwrap();
    let info = stream.info().await.unwrap();
    assert_eq!(info.state.messages, 300, "no event stored twice");
    assert_eq!(stored_in_order(&js, &name).await, appended(300));

    let projections = consumer_schema(&store).await;
    let handle = consumer(&client, &projections, &name).spawn();
    handle
        .wait_for(info.state.last_sequence, Duration::from_secs(20))
        .await
        .expect("the consumer reaches the end");
    assert_eq!(received(&store).await, (300, 300));

    // A copy beyond the duplicate window: stored again under another message id.
    let copy = jetstream::message::PublishMessage::build()
        .headers({
            let mut h = cqrs_nats::headers::for_event(&first[0], "Pinged", 1).unwrap();
            h.insert(cqrs_nats::headers::MSG_ID, "another-id");
            h
        })
        .payload(first[0].payload.as_str().as_bytes().to_vec().into());
    let ack = js
        .send_publish(format!("{prefix}.copy"), copy)
        .await
        .unwrap()
        .await
        .unwrap();
    handle
        .wait_for(ack.sequence, Duration::from_secs(20))
        .await
        .expect("the copy is consumed");
    assert_eq!(received(&store).await, (300, 300), "the copy is dropped");
    assert_eq!(applied_in_order(&store).await, appended(300));
    assert_eq!(handle.status().state, ConsumerState::Running);

    handle.stop().await;
    running.stop().await;
    js.delete_stream(&name).await.unwrap();
    drop_schema(&store).await;
}

/// A publish that fails in the middle of a batch (one event's subject belongs to no JetStream
/// stream, so JetStream rejects it until the stream takes that subject): while it fails, nothing
/// after it in the log is stored (the messages before it are, each once), the checkpoint stays
/// before the batch, and the status names the broker as the cause (not skippable). Once the
/// subject is taken, the relay resumes by itself, and each origin stream is stored and applied
/// in order, every event once. Run over five streams and over one (where the messages of a
/// batch are in flight together too), delivering and as a plain projection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_publish_mid_batch_keeps_each_streams_order() {
    failed_publish_mid_batch(5, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_publish_mid_batch_keeps_one_streams_order() {
    failed_publish_mid_batch(1, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_publish_mid_batch_keeps_order_without_delivering() {
    failed_publish_mid_batch(5, false).await;
}

async fn failed_publish_mid_batch(streams: i64, delivering: bool) {
    let store = store_with_search_path().await;
    let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let js = jetstream::new(client.clone());
    let (name, prefix) = (format!("T{}", unique()), format!("t{}", unique()));
    let mut config = jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![format!("{prefix}.pinger.>")],
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    js.create_stream(config.clone()).await.unwrap();
    append_over(&store, 0, 100, streams).await;
    let backend = Arc::new(PostgresProjections::new(store.clone()));

    // Event 37 goes to a subject outside the JetStream stream.
    let held = format!("{prefix}.held");
    let map = {
        let held = held.clone();
        move |event: &RecordedEvent| {
            let pinged: Pinged = event.decode()?;
            let message = cqrs_nats::IntegrationMessage::stored(event);
            Ok(Some(if pinged.n == 37 {
                message.on_subject(held.clone())
            } else {
                message
            }))
        }
    };
    let jetstream = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client.clone());
    let runner = ProjectionRunner::shared(
        Relay::<_, PgConnection>::new(jetstream, map, RelayConfig::new(&prefix)),
        Arc::clone(&backend),
    )
    .with_config(fast());
    let running = if delivering {
        runner.delivering().spawn()
    } else {
        runner.spawn()
    };
    let mut status = running.watch_status();
    let failed = tokio::time::timeout(
        Duration::from_secs(20),
        status.wait_for(|s| s.last_error.is_some()),
    )
    .await
    .expect("the relay reports the rejected publish")
    .unwrap()
    .clone();
    let error = failed.last_error.unwrap();
    assert_eq!(error.cause, FailureCause::Unavailable, "{error:?}");
    assert!(!error.skippable(), "{error:?}");
    assert_eq!(failed.checkpoint, None, "the first batch holds event 37");

    let log = log_ids(&store).await;
    assert_eq!(
        stored_ids(&js, &name).await,
        log[..37],
        "the events before the failed one stored once, in log order, nothing after it"
    );

    config.subjects.push(held);
    js.update_stream(&config).await.unwrap();
    let head = store.committed_head().await.unwrap().unwrap();
    running
        .wait_for(head, Duration::from_secs(20))
        .await
        .expect("the relay resumes by itself");
    assert_eq!(
        stored_in_order(&js, &name).await,
        appended_over(100, streams)
    );

    let projections = consumer_schema(&store).await;
    let consuming = consumer(&client, &projections, &name).spawn();
    let mut stream = js.get_stream(&name).await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    consuming
        .wait_for(last, Duration::from_secs(20))
        .await
        .expect("the consumer reaches the end");
    assert_eq!(received(&store).await, (100, 100));
    assert_eq!(applied_in_order(&store).await, appended_over(100, streams));

    consuming.stop().await;
    running.stop().await;
    js.delete_stream(&name).await.unwrap();
    drop_schema(&store).await;
}

/// An event the map cannot turn into a message (event 2,500 of 3,000, in batches of 1,000, so
/// that the batches before it are still being acknowledged when it is met): the relay publishes
/// and checkpoints everything before it, stops right before it with the map's error (skippable
/// there), and after the skip publishes the rest; the skipped event is never published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmappable_event_stops_the_relay_right_before_it() {
    let store = store_with_search_path().await;
    let client = async_nats::connect("127.0.0.1:4222").await.unwrap();
    let js = jetstream::new(client.clone());
    let (name, prefix) = (format!("T{}", unique()), format!("t{}", unique()));
    ensure_stream(
        &js,
        &name,
        vec![format!("{prefix}.>")],
        Duration::from_secs(120),
    )
    .await
    .unwrap();
    for chunk in 0..300 {
        let events = (chunk * 10..chunk * 10 + 10)
            .map(|n| NewEvent::from_event(&Pinged { n }).unwrap())
            .collect();
        store
            .append(
                &StreamId::new("pinger", format!("p{}", chunk % 5)),
                ExpectedVersion::Any,
                events,
            )
            .await
            .unwrap();
    }
    let log = store
        .read_all(Position::START, cqrs_core::EventTypes::All, 10_000)
        .await
        .unwrap();
    let map = |event: &RecordedEvent| {
        let pinged: Pinged = event.decode()?;
        if pinged.n == 2_500 {
            return Err("no public message for this one".into());
        }
        Ok(Some(cqrs_nats::IntegrationMessage::stored(event)))
    };
    let jetstream = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(client.clone());
    let running = ProjectionRunner::shared(
        Relay::<_, PgConnection>::new(jetstream, map, RelayConfig::new(&prefix)),
        Arc::new(PostgresProjections::new(store.clone())),
    )
    .with_config(
        RunnerConfig::builder()
            .batch_size(1_000)
            .initial_backoff(Duration::from_millis(50))
            .max_backoff(Duration::from_millis(300))
            .build()
            .unwrap(),
    )
    .delivering()
    .spawn();
    let mut status = running.watch_status();
    let failed = tokio::time::timeout(
        Duration::from_secs(20),
        status.wait_for(|s| s.last_error.is_some()),
    )
    .await
    .expect("the relay reports the event")
    .unwrap()
    .clone();
    let error = failed.last_error.unwrap();
    assert_eq!(error.cause, FailureCause::Handler, "{error:?}");
    assert_eq!(error.position, Some(log[2_500].position));
    assert!(error.skippable());
    assert_eq!(
        failed.checkpoint,
        Some(log[2_499].position),
        "right before it"
    );
    assert_eq!(stored_ids(&js, &name).await, log_ids(&store).await[..2_500]);

    running.skip(log[2_500].position).await;
    let head = store.committed_head().await.unwrap().unwrap();
    running
        .wait_for(head, Duration::from_secs(20))
        .await
        .expect("the relay goes on after the skip");
    let mut expected = log_ids(&store).await;
    expected.remove(2_500);
    assert_eq!(stored_ids(&js, &name).await, expected);

    running.stop().await;
    js.delete_stream(&name).await.unwrap();
    drop_schema(&store).await;
}

/// Every public future of the crate can be spawned (`Send`): a compile-time check.
#[allow(dead_code, clippy::let_underscore_future)]
fn public_futures_are_send(
    js: jetstream::Context,
    handle: cqrs_nats::ConsumerHandle,
    projections: PostgresProjections,
    mut relay: PgRelay,
    mut conn: PgConnection,
    event: RecordedEvent,
) {
    use cqrs_nats::Inbox;
    fn send<T: Send>(_: T) {}
    send(async move {
        let _ = ensure_stream(&js, "s", vec![], Duration::from_secs(1)).await;
        let _ = handle.wait_for(1, Duration::from_secs(1)).await;
        let _ = handle.wait_until(|_| true, Duration::from_secs(1)).await;
        handle.skip(1).await;
        handle.stop().await;
        let _ = cqrs_nats::postgres::migrate(&projections).await;
        let _ = cqrs_nats::postgres::skipped_messages(&projections, "c").await;
        let _ = Inbox::first_delivery(&projections, &mut conn, "c", event.event_id).await;
        let _ = Inbox::record_skip(&projections, "c", 1, None, "r").await;
        let _ = relay.handle(&event, &mut conn).await;
        let _ = relay.flush(&mut conn).await;
    });
}
