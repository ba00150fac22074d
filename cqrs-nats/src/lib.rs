//! Integration events through NATS JetStream: an outbox [`Relay`] that publishes the event log,
//! and a durable [`Consumer`] that feeds a projection or process manager in another service.
//!
//! The event store stays the source of truth; JetStream is the transport, not an event store
//! (its acknowledgement carries the JetStream stream's sequence, not a per-stream version).
//!
//! # The relay
//!
//! [`Relay`] is a [`Projection`](cqrs_core::Projection) run by the ordinary
//! [`ProjectionRunner`](cqrs_core::subscription::ProjectionRunner) on the event store's own
//! projection backend, so it has the runner's lease (one active relay per name), status, failure
//! policy and skips, and its checkpoint lives beside the events. It implements
//! [`Deliver`](cqrs_core::Deliver): run it
//! [`delivering`](cqrs_core::subscription::ProjectionRunner::delivering), and the runner hands
//! the next batches over while a batch's acknowledgements are awaited and its checkpoint
//! commits.
//!
//! - **Subjects**: `<prefix>.<stream type>.<message type>` (each percent-encoded into one token),
//!   or whatever [`IntegrationMessage::on_subject`] says. All subjects of one relay belong to one
//!   JetStream stream, which the relay publishes to alone (its order is the log's, see below).
//! - **Headers** ([`headers`]): `Nats-Msg-Id` = the event id, and `Cqrs-Event-Id`,
//!   `Cqrs-Event-Type` / `Cqrs-Schema-Version` (the public message's), `Cqrs-Stream-Type`,
//!   `Cqrs-Stream-Id`, `Cqrs-Stream-Version`, `Cqrs-Position`, `Cqrs-Recorded-At`,
//!   `Cqrs-Correlation-Id`, `Cqrs-Causation-Id`.
//! - **Contract, not payload**: an [`IntegrationMap`] turns an event into its public
//!   [`IntegrationMessage`] or into nothing (the relay's filter); [`PublishStored`] publishes the
//!   stored payload as is.
//! - **Checkpoint after the acks**: a batch's checkpoint commits only once every message of it
//!   (and of every batch before it) is acknowledged. When the front message's publish fails (no
//!   broker, an ack timeout, a rejection) it is sent again with the same `Nats-Msg-Id`, up to
//!   [`RelayConfig::publish_attempts`] times; then the batch fails: the checkpoint stays, the
//!   runner reports the typed [`RelayError`] as
//!   [`FailureCause::Unavailable`](cqrs_core::subscription::FailureCause::Unavailable) (retried
//!   with backoff, never skippable: skipping would drop the event for every other service), and
//!   publishes again from its checkpoint, so the relay resumes by itself when the broker is back.
//! - **Order, with many messages in flight**: messages are sent in log order without waiting for
//!   each other's acknowledgements, across streams and within one stream. The first
//!   unacknowledged message is sent unguarded (everything before it is acknowledged, i.e.
//!   stored); every other one carries `Nats-Expected-Last-Msg-Id` = the id of the message sent
//!   right before it, so JetStream stores it only right after that one. JetStream checks
//!   `Nats-Msg-Id` against its duplicate window before the guard, so a message it already
//!   stored comes back as a duplicate whatever its guard says. Together: the relay's messages in
//!   its JetStream stream are always a prefix of the log, in log order, whatever is lost,
//!   rejected or timed out; a message whose predecessor was not stored fails ("wrong last
//!   message id"), and after any failure the relay waits for the acknowledgements in flight and
//!   sends everything again from the first unacknowledged message. A guard that fails for
//!   another reason (the broker restarted and forgot its last message id, or something else
//!   published to the stream) costs such a restart, never the order; a stream that others
//!   publish to steadily makes the relay slow, not wrong. Messages without a guard would not
//!   do: a message lost with a dropped connection could be overtaken by the next one, which the
//!   client sends after reconnecting, and republishing the tail afterwards would store it after
//!   its successor.
//! - **Crash between publish and checkpoint**: the batch is published again after a restart.
//!   JetStream checks `Nats-Msg-Id` against its duplicate window (the stream's
//!   `duplicate_window`, 2 minutes by default) before anything else and drops the repeat. Beyond
//!   the window (the relay was down longer than it after a crash mid-batch), the repeat is stored
//!   a second time at a new sequence; consumers still see each event once because they
//!   de-duplicate by event id ([`Inbox`]). Size the window above the longest expected restart.
//! - **Broker crashes**: nats-server 2.9 fsyncs its file store on an interval (`sync_interval`),
//!   so a broker (not process) crash can lose acknowledged messages of the last interval; the
//!   relay will not republish them (its checkpoint moved). Use a replicated stream (R3) where
//!   that matters.
//!
//! # The consumer
//!
//! [`Consumer`] pulls from a durable JetStream consumer and commits each batch through a
//! [`ProjectionBackend`](cqrs_core::backend::ProjectionBackend) of the consuming service (e.g.
//! `PostgresProjections`): the handlers' writes, the de-duplication rows and the checkpoint (the
//! JetStream stream sequence, stored as `Position { tx: 0, sequence }`) commit in one
//! transaction, and messages are acknowledged only after it. Exactly-once in effect:
//!
//! - a message redelivered after its batch committed (a lost ack, a crash before the ack) has a
//!   sequence at or below the checkpoint: acknowledged again, applied never;
//! - a second copy of an event at a new sequence (a republish beyond the duplicate window) is
//!   dropped by its event id in the same transaction ([`Inbox::first_delivery`]);
//! - the durable consumer is (re)created at the checkpoint's next sequence on start and after
//!   every reconnect, so a message lost in delivery is never passed by a later one.
//!
//! Without a connection to the broker (a restart, a crash, no broker yet at start), the consumer
//! fetches nothing: it reports the broker's failure in its status (no sequence: nothing to skip)
//! and retries with backoff until the client has reconnected; a fetch whose connection drops
//! ends after twice [`ConsumerConfig::fetch_wait`] instead of waiting for an answer that never
//! comes.
//!
//! A client for a broker that may be down when the service starts is built with
//! `async_nats::ConnectOptions::retry_on_initial_connect` (a plain `connect` fails with a
//! `ConnectError`): the relay and the consumer then start, report the broker's failure and
//! deliver once it is up.
//!
//! A message that cannot be read (missing headers, a payload that is not JSON) or that its handler
//! cannot decode or handle stops the consumer right before it, with its sequence in
//! [`ConsumerStatus::last_error`]; [`ConsumerHandle::skip`] moves past it and records it
//! ([`Inbox::record_skip`]).

mod consumer;
pub mod headers;
#[cfg(feature = "postgres")]
pub mod postgres;
mod publisher;
mod relay;

pub use consumer::{
    Consumer, ConsumerConfig, ConsumerFailure, ConsumerHandle, ConsumerState, ConsumerStatus,
    Deduped, Inbox, UndecodableMessage,
};
pub use headers::MessageError;
pub use relay::{
    IntegrationMap, IntegrationMessage, PublishStored, Relay, RelayConfig, RelayError,
};

/// Creates the JetStream stream `name` for `subjects` with the given duplicate window, or returns
/// the existing one (file storage).
pub async fn ensure_stream(
    jetstream: &async_nats::jetstream::Context,
    name: &str,
    subjects: Vec<String>,
    duplicate_window: std::time::Duration,
) -> Result<async_nats::jetstream::stream::Stream, async_nats::Error> {
    let stream = jetstream
        .get_or_create_stream(async_nats::jetstream::stream::Config {
            name: name.to_owned(),
            subjects,
            duplicate_window,
            ..Default::default()
        })
        .await?;
    Ok(stream)
}
