//! The outbox relay: a projection over the event log whose "read model" is a JetStream stream.

use std::future::Future;
use std::marker::PhantomData;

use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::Context;
use cqrs_core::{
    Event, EventId, HandlerError, Position, Projection, ProjectionError, RawJson, RecordedEvent,
    Subscription,
};

use crate::headers;

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

/// Where the relay publishes.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The first subject token(s) of derived subjects.
    pub subject_prefix: String,
}

impl RelayConfig {
    /// Derived subjects start with `prefix` (e.g. `"orders.events"`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            subject_prefix: prefix.into(),
        }
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
        source: async_nats::jetstream::context::PublishError,
    },
}

struct Outgoing {
    event_id: EventId,
    position: Position,
    subject: String,
    message: Publish,
}

/// The relay: run it with a [`ProjectionRunner`](cqrs_core::subscription::ProjectionRunner) on
/// the event store's own projection backend (e.g. `PostgresProjections`, `C =
/// sqlx::PgConnection`), so that its checkpoint lives beside the events, its lease keeps one relay
/// active, and its failures, skips and status are the runner's.
///
/// A batch is mapped event by event (handlers), then published in [`Projection::flush`], before
/// the backend commits the checkpoint: every message is sent (pipelined, in log order, on one
/// connection), then every acknowledgement awaited; any failure fails the flush, so the
/// checkpoint moves only past acknowledged messages. See the crate docs for the order and the
/// duplicate window.
pub struct Relay<M, C = ()> {
    jetstream: Context,
    map: M,
    config: RelayConfig,
    pending: Vec<Outgoing>,
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

impl<M: IntegrationMap, C> Relay<M, C> {
    /// A relay publishing through `jetstream` what `map` makes of each event.
    pub fn new(jetstream: Context, map: M, config: RelayConfig) -> Self {
        Self {
            jetstream,
            map,
            config,
            pending: Vec::new(),
            context: PhantomData,
        }
    }

    async fn publish(&mut self) -> Result<(), RelayError> {
        let outgoing = std::mem::take(&mut self.pending);
        let failed = |o: &Outgoing, source| RelayError::Publish {
            event_id: o.event_id,
            position: o.position,
            subject: o.subject.clone(),
            source,
        };
        // One message at a time, each acknowledged before the next is sent: a message lost on a
        // dropped connection fails the batch before anything after it is stored, so the
        // stream keeps the log's order without an ordering header.
        for mut o in outgoing {
            let message = std::mem::replace(&mut o.message, Publish::build());
            let ack = self
                .jetstream
                .send_publish(o.subject.clone(), message)
                .await
                .map_err(|e| failed(&o, e))?;
            ack.await.map_err(|e| failed(&o, e))?;
        }
        Ok(())
    }
}

impl<M: IntegrationMap, C: Send + 'static> Projection for Relay<M, C> {
    const NAME: &'static str = "nats-relay";
    const EVENT_TYPES: &'static [&'static str] = &[];
    // The map decides what is published: the relay reads the whole log.
    const SUBSCRIPTION: Subscription = Subscription::ALL;
    type Context = C;

    fn handle<'a>(
        &'a mut self,
        event: &'a RecordedEvent,
        _: &'a mut C,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send + 'a {
        let outcome = self
            .map
            .map(event)
            .map_err(|source| ProjectionError::Handler {
                projection: Self::NAME,
                event_type: event.event_type.clone(),
                position: event.position,
                source,
            });
        let outcome = outcome.and_then(|message| {
            let Some(message) = message else {
                return Ok(());
            };
            let headers = headers::for_event(event, &message.message_type, message.schema_version)
                .map_err(|e| ProjectionError::Handler {
                    projection: Self::NAME,
                    event_type: event.event_type.clone(),
                    position: event.position,
                    source: e.into(),
                })?;
            let payload = message.payload.as_str().as_bytes().to_vec();
            let subject = message
                .subject
                .unwrap_or_else(|| self.config.subject(event, &message.message_type));
            self.pending.push(Outgoing {
                event_id: event.event_id,
                position: event.position,
                subject,
                message: Publish::build()
                    .headers(headers)
                    .message_id(event.event_id.to_string())
                    .payload(payload.into()),
            });
            Ok(())
        });
        std::future::ready(outcome)
    }

    async fn flush(&mut self, _: &mut C) -> Result<(), ProjectionError> {
        self.publish().await.map_err(|e| ProjectionError::Flush {
            projection: Self::NAME,
            source: e.into(),
        })
    }

    fn discard(&mut self) {
        self.pending.clear();
    }
}
