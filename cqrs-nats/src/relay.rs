//! The outbox relay: a projection over the event log whose "read model" is a JetStream stream.

use std::future::Future;
use std::marker::PhantomData;

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::Context;
use cqrs_core::{
    Deliver, Delivery, Event, EventId, HandlerError, Position, Projection, ProjectionError,
    RawJson, RecordedEvent, Subscription,
};

use crate::headers;
use crate::publisher::{Outgoing, Publisher};

/// What the relay publishes for one event: the public message (integration events are a
/// contract with other services, not the internal payload).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct IntegrationMessage {
    /// The public message type (header `Cqrs-Event-Type`; the consumer routes on it).
    pub message_type: String,
    /// The public message's schema version.
    pub schema_version: u32,
    /// The JSON body.
    pub payload: RawJson,
    /// The subject; `None`: `<prefix>.<stream type>.<message type>` (see [`RelayConfig`]).
    pub subject: Option<String>,
}

impl IntegrationMessage {
    /// A public event type (an `#[event]` of the shared contract), serialized as its own name and
    /// version.
    pub fn of<E: Event>(message: &E) -> Result<Self, serde_json::Error> {
        Ok(Self {
            message_type: E::NAME.to_owned(),
            schema_version: E::VERSION,
            payload: RawJson::encode(message)?,
            subject: None,
        })
    }

    /// The stored event as is: for consumers that may depend on the internal payload.
    pub fn stored(event: &RecordedEvent) -> Self {
        Self {
            message_type: event.event_type.clone(),
            schema_version: event.schema_version,
            payload: event.payload.clone(),
            subject: None,
        }
    }

    /// Publishes on `subject` instead of the derived one.
    pub fn on_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }
}

/// Maps an event of the log to its integration message; `None` publishes nothing for it (the
/// relay's filter). An error fails the relay at the event's position, where it can be skipped.
pub trait IntegrationMap: Send + Sync + 'static {
    /// The message for `event`, if it is published.
    fn map(&self, event: &RecordedEvent) -> Result<Option<IntegrationMessage>, HandlerError>;
}

impl<F> IntegrationMap for F
where
    F: Fn(&RecordedEvent) -> Result<Option<IntegrationMessage>, HandlerError>
        + Send
        + Sync
        + 'static,
{
    fn map(&self, event: &RecordedEvent) -> Result<Option<IntegrationMessage>, HandlerError> {
        self(event)
    }
}

/// Publishes every event with its stored type and payload ([`IntegrationMessage::stored`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct PublishStored;

impl IntegrationMap for PublishStored {
    fn map(&self, event: &RecordedEvent) -> Result<Option<IntegrationMessage>, HandlerError> {
        Ok(Some(IntegrationMessage::stored(event)))
    }
}

/// Where and how the relay publishes.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The first subject token(s) of derived subjects.
    pub subject_prefix: String,
    publish_attempts: u32,
}

impl RelayConfig {
    /// Derived subjects start with `prefix` (e.g. `"orders.events"`); the first unacknowledged
    /// message is published up to 3 times before its batch fails.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            subject_prefix: prefix.into(),
            publish_attempts: 3,
        }
    }

    /// How many times the first unacknowledged message is published (the first time and its
    /// republishes after a failed or timed-out acknowledgement of it) before its batch fails and
    /// the runner retries from its checkpoint with backoff; at least 1. A message that fails only
    /// because one before it did (its ordering guard) is not counted.
    pub fn publish_attempts(mut self, attempts: u32) -> Self {
        self.publish_attempts = attempts.max(1);
        self
    }

    /// `<prefix>.<stream type>.<message type>`, both percent-encoded into one token each.
    pub fn subject(&self, event: &RecordedEvent, message_type: &str) -> String {
        format!(
            "{}.{}.{}",
            self.subject_prefix,
            headers::encode(event.stream.stream_type()),
            headers::encode(message_type)
        )
    }
}

/// Why the relay could not publish a batch: nothing of it is checkpointed, the runner retries
/// it with backoff (never offered as a skippable event: the broker is not the event's fault).
/// It reaches the runner as [`ProjectionError::Unavailable`], so its status shows
/// [`FailureCause::Unavailable`](cqrs_core::subscription::FailureCause::Unavailable).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// JetStream did not accept (or did not acknowledge in time) the message for an event.
    #[error("publishing event {event_id} (position {position}) to `{subject}` failed")]
    Publish {
        /// The event.
        event_id: EventId,
        /// Its position.
        position: Position,
        /// The subject.
        subject: String,
        /// The client's error (kind: timed out, no stream, wrong last message id, ...).
        #[source]
        source: PublishError,
    },
    /// The relay's publisher stopped after an earlier batch failed: this batch was not sent. The
    /// runner goes back to its checkpoint and publishes from there.
    #[error("the relay stopped publishing after an earlier batch failed")]
    Stopped,
}

/// The relay: run it with a [`ProjectionRunner`](cqrs_core::subscription::ProjectionRunner) on
/// the event store's own projection backend (e.g. `PostgresProjections`, `C =
/// sqlx::PgConnection`), so that its checkpoint lives beside the events, its lease keeps one relay
/// active, and its failures, skips and status are the runner's. Run it
/// [`delivering`](cqrs_core::subscription::ProjectionRunner::delivering): the runner then hands
/// the next batches over while a batch's acknowledgements are awaited and its checkpoint
/// commits, and moves the checkpoint past a batch only once every message of it is
/// acknowledged. Run as a plain projection, a batch is published in [`Projection::flush`] and
/// its checkpoint committed before the next batch is read.
///
/// Messages go out in log order, many in flight at once: each one after the first
/// unacknowledged message carries `Nats-Expected-Last-Msg-Id` (the id of the message before
/// it), so JetStream stores nothing of a stream before its predecessor, whatever is lost or
/// rejected; after a failure the messages from the first unacknowledged one are sent again (the
/// stored ones come back as duplicates), the first one up to
/// [`RelayConfig::publish_attempts`] times, after which the batch fails and the checkpoint
/// stays. See the crate docs for the order and the duplicate window.
pub struct Relay<M, C = ()> {
    jetstream: Context,
    map: M,
    config: RelayConfig,
    pending: Vec<Outgoing>,
    /// Started at the first publish, replaced after [`Projection::discard`].
    publisher: Option<Publisher>,
    context: PhantomData<fn() -> C>,
}

impl<M, C> std::fmt::Debug for Relay<M, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("config", &self.config)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

/// The relay's projection name (its default checkpoint name).
const RELAY: &str = "nats-relay";

impl<M: IntegrationMap, C> Relay<M, C> {
    /// A relay publishing through `jetstream` what `map` makes of each event.
    pub fn new(jetstream: Context, map: M, config: RelayConfig) -> Self {
        Self {
            jetstream,
            map,
            config,
            pending: Vec::new(),
            publisher: None,
            context: PhantomData,
        }
    }

    /// The message for `event`, if the map publishes one; an error is the event's (skippable at
    /// its position).
    fn message(&self, event: &RecordedEvent) -> Result<Option<Outgoing>, ProjectionError> {
        let handler = |source: HandlerError| ProjectionError::Handler {
            projection: RELAY,
            event_type: event.event_type.clone(),
            position: event.position,
            source,
        };
        let Some(message) = self.map.map(event).map_err(handler)? else {
            return Ok(None);
        };
        let headers = headers::for_event(event, &message.message_type, message.schema_version)
            .map_err(|e| handler(e.into()))?;
        let payload = message.payload.as_str().as_bytes().to_vec();
        let subject = message
            .subject
            .unwrap_or_else(|| self.config.subject(event, &message.message_type));
        Ok(Some(Outgoing {
            event_id: event.event_id,
            position: event.position,
            subject,
            message: Publish::build()
                .headers(headers)
                .message_id(event.event_id.to_string())
                .payload(payload.into()),
        }))
    }

    /// Hands `messages` to the publisher (started on first use); the future resolves once all
    /// of them are acknowledged.
    fn publish(
        &mut self,
        messages: Vec<Outgoing>,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send + 'static {
        let (jetstream, attempts) = (&self.jetstream, self.config.publish_attempts);
        let publisher = self
            .publisher
            .get_or_insert_with(|| Publisher::start(jetstream.clone(), attempts));
        let acknowledged = publisher.publish(messages);
        async move {
            // The broker's failure, not the events': retried, never skippable.
            acknowledged
                .await
                .map_err(|e| ProjectionError::Unavailable {
                    projection: RELAY,
                    source: e.into(),
                })
        }
    }
}

impl<M: IntegrationMap, C: Send + 'static> Projection for Relay<M, C> {
    const NAME: &'static str = RELAY;
    const EVENT_TYPES: &'static [&'static str] = &[];
    // The map decides what is published: the relay reads the whole log.
    const SUBSCRIPTION: Subscription = Subscription::ALL;
    type Context = C;

    fn handle<'a>(
        &'a mut self,
        event: &'a RecordedEvent,
        _: &'a mut C,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send + 'a {
        let outcome = self.message(event).map(|message| {
            self.pending.extend(message);
        });
        std::future::ready(outcome)
    }

    async fn flush(&mut self, _: &mut C) -> Result<(), ProjectionError> {
        let messages = std::mem::take(&mut self.pending);
        self.publish(messages).await
    }

    fn discard(&mut self) {
        self.pending.clear();
        // What was handed over and not acknowledged is abandoned: the runner goes back to its
        // checkpoint, where a new publisher starts (its first message unguarded).
        self.publisher = None;
    }
}

impl<M: IntegrationMap, C: Send + 'static> Deliver for Relay<M, C> {
    async fn deliver(&mut self, events: &[RecordedEvent]) -> Result<Delivery, ProjectionError> {
        let mut messages = Vec::with_capacity(events.len());
        for event in events {
            messages.extend(self.message(event)?);
        }
        Ok(Box::pin(self.publish(messages)))
    }
}
