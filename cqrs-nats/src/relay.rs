//! The outbox relay: a projection over the event log whose "read model" is a JetStream stream.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::marker::PhantomData;

use async_nats::jetstream::context::PublishError;
use async_nats::jetstream::message::PublishMessage as Publish;
use async_nats::jetstream::Context;
use cqrs_core::{
    Event, EventId, HandlerError, Position, Projection, ProjectionError, RawJson, RecordedEvent,
    StreamId, Subscription,
};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;

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

/// Where and how the relay publishes.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The first subject token(s) of derived subjects.
    pub subject_prefix: String,
    publish_attempts: u32,
}

impl RelayConfig {
    /// Derived subjects start with `prefix` (e.g. `"orders.events"`); each message is published
    /// up to 3 times within a batch before the batch fails.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            subject_prefix: prefix.into(),
            publish_attempts: 3,
        }
    }

    /// How many times one message is published (the first time and its republishes after a
    /// failed or timed-out acknowledgement) before its batch fails and the runner retries the
    /// batch with backoff; at least 1.
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
}

struct Outgoing {
    event_id: EventId,
    position: Position,
    /// The source stream: its messages are published one at a time, in log order.
    stream: StreamId,
    subject: String,
    message: Publish,
}

/// Publishes `message` and awaits its acknowledgement; answers with its lane and attempt.
fn send(
    jetstream: &Context,
    lane: usize,
    attempt: u32,
    message: &Outgoing,
) -> impl Future<Output = (usize, u32, Result<(), PublishError>)> + Send + 'static {
    let jetstream = jetstream.clone();
    let subject = message.subject.clone();
    let publish = message.message.clone();
    async move {
        let acked = async { jetstream.send_publish(subject, publish).await?.await };
        (lane, attempt, acked.await.map(drop))
    }
}

/// The relay: run it with a [`ProjectionRunner`](cqrs_core::subscription::ProjectionRunner) on
/// the event store's own projection backend (e.g. `PostgresProjections`, `C =
/// sqlx::PgConnection`), so that its checkpoint lives beside the events, its lease keeps one relay
/// active, and its failures, skips and status are the runner's.
///
/// A batch is mapped event by event (handlers), then published in [`Projection::flush`], before
/// the backend commits the checkpoint: the messages of different source streams are in flight
/// together, those of one source stream one at a time in log order; a message whose publish
/// fails is republished (same `Nats-Msg-Id`) before its stream's next message is sent, up to
/// [`RelayConfig::publish_attempts`] times, after which the flush fails, so the checkpoint moves
/// only past acknowledged messages. See the crate docs for the order and the duplicate window.
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

    /// Publishes the batch. The rule, which keeps each source stream's order in the JetStream
    /// stream whatever fails: a message is sent only once its stream's previous message is
    /// acknowledged. An acknowledgement (also a duplicate's) means JetStream has stored that
    /// message, so nothing can be stored before its predecessor: a message lost with a dropped
    /// connection, or rejected, is republished before anything after it in its stream is sent,
    /// and a copy of it still travelling from an earlier attempt is dropped as a duplicate
    /// within the window. Messages of different streams have no order between them, so they
    /// are in flight together (one per stream), which is what makes a batch fast. After the
    /// last attempt fails, nothing more is sent, the messages in flight are awaited, and the
    /// batch fails: its checkpoint stays, and the retried batch republishes it from its start
    /// under the same rule (what was stored comes back as duplicates).
    async fn publish(&mut self) -> Result<(), RelayError> {
        let outgoing = std::mem::take(&mut self.pending);
        let mut lanes: Vec<VecDeque<Outgoing>> = Vec::new();
        let mut lane_of: HashMap<StreamId, usize> = HashMap::new();
        for message in outgoing {
            let lane = *lane_of.entry(message.stream.clone()).or_insert_with(|| {
                lanes.push(VecDeque::new());
                lanes.len() - 1
            });
            lanes[lane].push_back(message);
        }
        let mut in_flight = FuturesUnordered::new();
        for (lane, queue) in lanes.iter().enumerate() {
            if let Some(first) = queue.front() {
                in_flight.push(send(&self.jetstream, lane, 1, first));
            }
        }
        let mut failure: Option<RelayError> = None;
        while let Some((lane, attempt, acked)) = in_flight.next().await {
            match acked {
                Ok(()) => {
                    lanes[lane].pop_front();
                    if failure.is_none() {
                        if let Some(next) = lanes[lane].front() {
                            in_flight.push(send(&self.jetstream, lane, 1, next));
                        }
                    }
                }
                Err(source) => {
                    let Some(message) = lanes[lane].front() else {
                        continue;
                    };
                    if failure.is_some() {
                        continue;
                    }
                    if attempt < self.config.publish_attempts {
                        tracing::debug!(event_id = %message.event_id, attempt, error = %source,
                            "publish failed; republishing");
                        in_flight.push(send(&self.jetstream, lane, attempt + 1, message));
                    } else {
                        failure = Some(RelayError::Publish {
                            event_id: message.event_id,
                            position: message.position,
                            subject: message.subject.clone(),
                            source,
                        });
                    }
                }
            }
        }
        failure.map_or(Ok(()), Err)
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
                stream: event.stream.clone(),
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
        // The broker's failure, not the events': retried, never skippable.
        self.publish()
            .await
            .map_err(|e| ProjectionError::Unavailable {
                projection: Self::NAME,
                source: e.into(),
            })
    }

    fn discard(&mut self) {
        self.pending.clear();
    }
}
