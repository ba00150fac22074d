//! Broker faults, each against a private nats-server ([`Broker`]): the relay and the consumer
//! keep running through a restart and through a start without a broker, and resume by
//! themselves; a message the consumer cannot read stops it at its sequence until skipped.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream;
use cqrs_core::subscription::{FailureCause, ProjectionHandle, ProjectionRunner, ProjectionState};
use cqrs_core::EventStore;
use cqrs_nats::{ensure_stream, ConsumerHandle, ConsumerState, PublishStored, Relay, RelayConfig};
use cqrs_postgres::PostgresProjections;

use super::broker::Broker;
use super::{
    append, appended, applied_in_order, consumer, consumer_schema, drop_schema, fast, log_ids,
    received, store_with_search_path, stored_ids, stored_in_order, unique, PgRelay, Pinged,
};

/// A client that reconnects quickly and, without a broker at start, keeps trying instead of
/// failing.
async fn client(broker: &Broker) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .reconnect_delay_callback(|_| Duration::from_millis(50))
        .connect(broker.url())
        .await
        .unwrap()
}

/// A relay whose acknowledgements time out quickly while the broker is away.
fn relay(client: &async_nats::Client, prefix: &str) -> PgRelay {
    let jetstream = jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(500))
        .build(client.clone());
    Relay::new(jetstream, PublishStored, RelayConfig::new(prefix))
}

/// Waits until the relay reports that the broker is failing it: a publish error, in the
/// `Failed` state (retrying, not stopped), never offered as a skippable poison event.
async fn relay_reports_publish_failure(relay: &ProjectionHandle<PgRelay>) {
    let mut status = relay.watch_status();
    let failed = tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.state == ProjectionState::Failed),
    )
    .await
    .expect("the relay reports the broker's failure")
    .unwrap()
    .clone();
    let error = failed.last_error.expect("a failure is reported");
    assert!(
        !error.skippable(),
        "a broker failure is no poison event: {error:?}"
    );
    assert_eq!(error.position, None, "{error:?}");
    assert_eq!(error.cause, FailureCause::Unavailable, "{error:?}");
    assert!(
        error.message.contains("publishing event"),
        "the relay's typed error: {}",
        error.message
    );
}

/// Waits until the consumer reports a failure that belongs to no message (the broker's). The
/// bound is below the client's own fallback timeout for a pull request (its expiry plus five
/// seconds): a fetch lost with the connection must not keep the consumer waiting that long.
async fn consumer_reports_broker_failure(consumer: &ConsumerHandle) {
    let failed = consumer
        .wait_until(
            |s| s.state == ConsumerState::Failed && s.last_error.is_some(),
            Duration::from_secs(4),
        )
        .await
        .expect("the consumer reports the broker's failure");
    let error = failed.last_error.unwrap();
    assert_eq!(error.sequence, None, "no message to skip: {error:?}");
}

/// The broker crashed and restarted while the relay and the consumer run: both report the broker's failure
/// (typed, retrying, not skippable) and resume by themselves when it is back; every event is
/// stored in the JetStream stream once and applied once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_is_survived_by_relay_and_consumer() {
    let mut broker = Broker::start();
    let store = store_with_search_path().await;
    let client = client(&broker).await;
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
    let backend = Arc::new(PostgresProjections::new(store.clone()));
    let projections = consumer_schema(&store).await;

    append(&store, 0, 100).await;
    let running = ProjectionRunner::shared(relay(&client, &prefix), Arc::clone(&backend))
        .with_config(fast())
        .delivering()
        .spawn();
    let consuming = consumer(&client, &projections, &name).spawn();
    let head = store.committed_head().await.unwrap().unwrap();
    running
        .wait_for(head, Duration::from_secs(20))
        .await
        .unwrap();
    consuming
        .wait_for(100, Duration::from_secs(20))
        .await
        .expect("the consumer reaches the stream's end");

    broker.kill();
    append(&store, 100, 200).await;
    relay_reports_publish_failure(&running).await;
    consumer_reports_broker_failure(&consuming).await;
    // The events appended during the outage all come after `head`.
    let checkpoint = running.status().checkpoint.unwrap();
    assert!(
        checkpoint <= head,
        "nothing unacknowledged is checkpointed: {checkpoint} is after {head}"
    );

    broker.up();
    let head = store.committed_head().await.unwrap().unwrap();
    running
        .wait_for(head, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(running.status().state, ProjectionState::Running);
    let mut stream = js.get_stream(&name).await.unwrap();
    let info = stream.info().await.unwrap().state.clone();
    assert_eq!(info.messages, 200, "every event stored once");
    consuming
        .wait_for(info.last_sequence, Duration::from_secs(20))
        .await
        .expect("the consumer resumes");
    assert_eq!(
        received(&store).await,
        (200, 200),
        "every event applied once"
    );
    assert_eq!(
        stored_in_order(&js, &name).await,
        appended(200),
        "each origin stream stored in order, nothing lost or repeated"
    );
    assert_eq!(
        applied_in_order(&store).await,
        appended(200),
        "each origin stream applied in order"
    );
    assert_eq!(consuming.status().state, ConsumerState::Running);

    consuming.stop().await;
    running.stop().await;
    drop_schema(&store).await;
}

/// The broker killed while the relay has batches in flight (a long log in small batches, the
/// runner handing the next batches over while earlier ones are acknowledged and checkpointed):
/// the relay's checkpoint never passes a message JetStream has not stored. Checked against the
/// log with the relay stopped while the broker is down: once the broker is back, every event up
/// to the checkpoint is in the JetStream stream, and what is stored is a prefix of the log, in
/// log order. Then the relay resumes: every event stored once, in each stream's order, and
/// applied once by the consumer, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_batch_never_checkpoints_an_unstored_message() {
    let mut broker = Broker::start();
    let store = store_with_search_path().await;
    let client = client(&broker).await;
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
    let backend = Arc::new(PostgresProjections::new(store.clone()));
    // 3,000 events, ten per append, each append to one of five streams.
    for chunk in 0..300 {
        let events = (chunk * 10..chunk * 10 + 10)
            .map(|n| cqrs_core::NewEvent::from_event(&Pinged { n }).unwrap())
            .collect();
        store
            .append(
                &cqrs_core::StreamId::new("pinger", format!("p{}", chunk % 5)),
                cqrs_core::ExpectedVersion::Any,
                events,
            )
            .await
            .unwrap();
    }
    let running = ProjectionRunner::shared(relay(&client, &prefix), Arc::clone(&backend))
        .with_config(fast())
        .delivering()
        .spawn();

    // Killed once some of the log is stored, while the rest is on its way.
    let mut stream = js.get_stream(&name).await.unwrap();
    while stream.info().await.unwrap().state.messages < 500 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    broker.kill();
    // Until the relay reports the broker's failure (or, were it to checkpoint unacknowledged
    // messages, reaches the head).
    let head = store.committed_head().await.unwrap();
    let mut status = running.watch_status();
    tokio::time::timeout(
        Duration::from_secs(10),
        status.wait_for(|s| s.state == ProjectionState::Failed || s.checkpoint >= head),
    )
    .await
    .expect("the relay reports the broker's failure")
    .unwrap();
    running.stop().await;
    let checkpoint =
        cqrs_core::backend::ProjectionBackend::<PgRelay>::load_checkpoint(&*backend, "nats-relay")
            .await
            .unwrap();

    broker.up();
    while client.connection_state() != async_nats::connection::State::Connected {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let log = store
        .read_all(
            cqrs_core::Position::START,
            cqrs_core::EventTypes::All,
            10_000,
        )
        .await
        .unwrap();
    assert_eq!(log.len(), 3_000);
    let stored = stored_ids(&js, &name).await;
    let checkpointed = log
        .iter()
        .take_while(|e| Some(e.position) <= checkpoint)
        .count();
    assert!(
        checkpointed <= stored.len(),
        "the checkpoint ({checkpoint:?}, {checkpointed} events) is ahead of the {} stored messages",
        stored.len()
    );
    assert_eq!(
        stored,
        log_ids(&store).await[..stored.len()],
        "JetStream holds a prefix of the log, in log order"
    );

    let running = ProjectionRunner::shared(relay(&client, &prefix), Arc::clone(&backend))
        .with_config(fast())
        .delivering()
        .spawn();
    let head = store.committed_head().await.unwrap().unwrap();
    running
        .wait_for(head, Duration::from_secs(30))
        .await
        .unwrap();
    let info = stream.info().await.unwrap().state.clone();
    assert_eq!(info.messages, 3_000, "every event stored once");
    assert_eq!(stored_in_order(&js, &name).await, appended(3_000));
    let projections = consumer_schema(&store).await;
    let consuming = consumer(&client, &projections, &name).spawn();
    consuming
        .wait_for(info.last_sequence, Duration::from_secs(30))
        .await
        .expect("the consumer reaches the end");
    assert_eq!(
        received(&store).await,
        (3_000, 3_000),
        "every event applied once"
    );
    assert_eq!(applied_in_order(&store).await, appended(3_000));

    consuming.stop().await;
    running.stop().await;
    drop_schema(&store).await;
}

/// No broker at start (its stream exists from an earlier run): a plain connect fails with a
/// typed error, while a client that retries its first connection lets the relay and the consumer
/// start. Both report the broker's failure (typed, retrying, not skippable) until it is up, then
/// deliver every event once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_without_broker_waits_for_it() {
    let mut broker = Broker::start();
    let (name, prefix) = (format!("T{}", unique()), format!("t{}", unique()));
    let setup = async_nats::connect(broker.url()).await.unwrap();
    ensure_stream(
        &jetstream::new(setup.clone()),
        &name,
        vec![format!("{prefix}.>")],
        Duration::from_secs(120),
    )
    .await
    .unwrap();
    drop(setup);
    broker.down();

    let refused = async_nats::connect(broker.url()).await.unwrap_err();
    assert_eq!(
        refused.kind(),
        async_nats::ConnectErrorKind::Io,
        "{refused}"
    );

    let store = store_with_search_path().await;
    let backend = Arc::new(PostgresProjections::new(store.clone()));
    let projections = consumer_schema(&store).await;
    append(&store, 0, 60).await;
    let client = client(&broker).await;
    let running = ProjectionRunner::shared(relay(&client, &prefix), Arc::clone(&backend))
        .with_config(fast())
        .delivering()
        .spawn();
    let consuming = consumer(&client, &projections, &name).spawn();
    relay_reports_publish_failure(&running).await;
    consumer_reports_broker_failure(&consuming).await;
    assert_eq!(running.status().checkpoint, None, "nothing is checkpointed");

    broker.up();
    let head = store.committed_head().await.unwrap().unwrap();
    running
        .wait_for(head, Duration::from_secs(20))
        .await
        .unwrap();
    let mut stream = jetstream::new(client.clone())
        .get_stream(&name)
        .await
        .unwrap();
    let info = stream.info().await.unwrap().state.clone();
    assert_eq!(info.messages, 60, "every event stored once");
    consuming
        .wait_for(info.last_sequence, Duration::from_secs(20))
        .await
        .expect("the consumer starts consuming");
    assert_eq!(received(&store).await, (60, 60), "every event applied once");

    consuming.stop().await;
    running.stop().await;
    drop_schema(&store).await;
}

/// Messages the consumer cannot read (a stranger's message on the stream's subjects, then one
/// with an event's headers and a payload that is not JSON): the consumer stops right before each,
/// at its stream sequence, with nothing after it applied; `skip` moves past it and records it,
/// and the messages after it are applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_message_is_skipped_on_request() {
    let broker = Broker::start();
    let store = store_with_search_path().await;
    let client = client(&broker).await;
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
    let projections = consumer_schema(&store).await;
    append(&store, 0, 6).await;
    let events = store
        .read_all(cqrs_core::Position::START, cqrs_core::EventTypes::All, 6)
        .await
        .unwrap();

    let publish = |headers: Option<async_nats::HeaderMap>, payload: Vec<u8>| {
        let js = js.clone();
        let subject = format!("{prefix}.pinger.Pinged");
        async move {
            let mut message = jetstream::message::PublishMessage::build().payload(payload.into());
            if let Some(headers) = headers {
                message = message.headers(headers);
            }
            js.send_publish(subject, message)
                .await
                .unwrap()
                .await
                .unwrap()
                .sequence
        }
    };
    let good = |event: &cqrs_core::RecordedEvent| {
        let headers = cqrs_nats::headers::for_event(event, &event.event_type, 1).unwrap();
        publish(Some(headers), event.payload.as_str().as_bytes().to_vec())
    };
    good(&events[0]).await;
    good(&events[1]).await;
    let stranger = publish(None, b"hello".to_vec()).await;
    let mut garbled_headers = cqrs_nats::headers::for_event(&events[2], "Pinged", 1).unwrap();
    garbled_headers.insert(cqrs_nats::headers::MSG_ID, "garbled");
    let garbled = publish(Some(garbled_headers), b"{not json".to_vec()).await;
    let mut last = 0;
    for event in &events[2..] {
        last = good(event).await;
    }

    let durable = format!("c{}", unique());
    let config = cqrs_nats::ConsumerConfig::new(&name, &durable)
        .backoff(Duration::from_millis(50), Duration::from_millis(300));
    let consuming = cqrs_nats::Consumer::new(
        client.clone(),
        super::Received,
        Arc::clone(&projections),
        Arc::clone(&projections),
        config,
    )
    .spawn();

    for (bad, applied, why) in [
        (stranger, 2, "header `Cqrs-Event-Id` is missing"),
        (garbled, 2, "the payload is not JSON"),
    ] {
        let failing = consuming
            .wait_until(
                |s| {
                    s.last_error
                        .as_ref()
                        .is_some_and(|e| e.sequence == Some(bad))
                },
                Duration::from_secs(10),
            )
            .await
            .expect("the consumer fails at the unreadable message");
        assert_eq!(failing.state, ConsumerState::Failed);
        assert_eq!(failing.sequence, Some(bad - 1), "stopped right before it");
        assert_eq!(received(&store).await, (applied, applied));
        let message = &failing.last_error.unwrap().message;
        assert!(message.contains(why), "{message}");
        consuming.skip(bad).await;
    }
    consuming
        .wait_for(last, Duration::from_secs(10))
        .await
        .expect("the messages after the skipped ones are applied");
    assert_eq!(received(&store).await, (6, 6));
    assert_eq!(consuming.status().state, ConsumerState::Running);
    let skipped = cqrs_nats::postgres::skipped_messages(&projections, &durable)
        .await
        .unwrap();
    let skipped: Vec<_> = skipped.into_iter().map(|(s, id, _)| (s, id)).collect();
    assert_eq!(
        skipped,
        vec![(stranger, None), (garbled, Some(events[2].event_id))],
        "both skips recorded, the second with the event id its headers carry"
    );

    consuming.stop().await;
    drop_schema(&store).await;
}
