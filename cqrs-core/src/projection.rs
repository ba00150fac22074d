//! Projections: read models built from the global log.
//!
//! `#[projection]` on an impl block implements [`Projection`]: it routes each stored event to the
//! handler method whose event parameter has that type, and lists the handled types so the store
//! reads only those. A handler taking the envelope itself (`event: &RecordedEvent`, payload not
//! decoded) handles every event the others do not: a catch-all. `streams(...)` narrows a
//! projection to some stream types (categories). Both are a [`Subscription`].

use std::error::Error as StdError;
use std::future::Future;

use crate::event::RecordedEvent;
use crate::store::EventTypes;
use crate::stream::Position;
use crate::upcast::DecodeError;

/// A type-erased handler error.
pub type HandlerError = Box<dyn StdError + Send + Sync>;

/// A read model fed by events.
pub trait Projection: Send + 'static {
    /// Unique name; the key of its checkpoint.
    const NAME: &'static str;
    /// The stored type names this projection's typed handlers handle.
    const EVENT_TYPES: &'static [&'static str];
    /// The events the runner feeds this projection; every other event is skipped undecoded
    /// (and, when the filter is by event type, unread). The default is exactly
    /// [`Projection::EVENT_TYPES`] from every stream. `#[projection]` sets it for a catch-all
    /// handler ([`EventTypes::All`]) and for `streams(...)`.
    const SUBSCRIPTION: Subscription = Subscription::types(Self::EVENT_TYPES);
    /// What handlers get besides the event: `()` for in-memory read models, a database connection
    /// (e.g. `sqlx::PgConnection`) for read models that commit together with the checkpoint.
    type Context: Send;

    /// Applies one event. Events [`Projection::SUBSCRIPTION`] does not match are ignored.
    fn handle<'a>(
        &'a mut self,
        event: &'a RecordedEvent,
        context: &'a mut Self::Context,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send + 'a;

    /// Called once after the last event of a batch, before the batch commits, with the same
    /// context: write what the handlers buffered (for example one multi-row `INSERT` for the
    /// whole batch instead of one statement per event). `#[projection]` generates it from a method
    /// marked `#[flush]`. The default does nothing.
    fn flush<'a>(
        &'a mut self,
        context: &'a mut Self::Context,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send + 'a {
        let _ = context;
        std::future::ready(Ok(()))
    }

    /// Called when a batch is abandoned (a handler or [`Projection::flush`] failed and its
    /// transaction rolled back): drop whatever the handlers buffered, so that the next attempt
    /// does not write it twice. `#[projection]` generates it from a method marked `#[discard]`.
    /// The default does nothing.
    fn discard(&mut self) {}
}

/// A projection whose read model is outside its backend (a message broker, a remote service):
/// its effects leave the process, and the outside system acknowledges them later. The backend
/// keeps only its checkpoint.
///
/// Run with [`ProjectionRunner::delivering`](crate::subscription::ProjectionRunner::delivering),
/// the runner pipelines such a projection: it hands batch N+1 over ([`Deliver::deliver`]) while
/// batch N's [`Delivery`] is awaited and its checkpoint commits, and reads batch N+2 meanwhile.
/// The checkpoint still moves only past acknowledged batches, in order, one checkpoint-only
/// commit per batch: a batch's checkpoint commits only after its own delivery and every earlier
/// batch's have resolved `Ok`. When a delivery fails, the runner drops the deliveries handed over
/// after it, calls [`Projection::discard`], and starts again from its checkpoint; so the outside
/// system must tolerate a batch delivered again (for example de-duplicate by event id), as after
/// any crash between an effect and its checkpoint.
///
/// The projection must keep what it hands over in order: batch N+1's effects may not overtake
/// batch N's where order matters to the outside system.
pub trait Deliver: Projection {
    /// Hands `events` (one batch in log order, each matching
    /// [`Projection::SUBSCRIPTION`], right after the batch handed over before it, or right after
    /// the checkpoint for the first batch since the runner started or last called
    /// [`Projection::discard`]) to the outside system. Returns the batch's acknowledgement,
    /// which resolves `Ok` once every effect of the batch is durable there.
    ///
    /// An error for one event (with its position, like a handler's) means nothing of the batch
    /// was handed over: the runner hands the events before it over on their own, commits them,
    /// and stops right before it, where it can be skipped.
    fn deliver<'a>(
        &'a mut self,
        events: &'a [RecordedEvent],
    ) -> impl Future<Output = Result<Delivery, ProjectionError>> + Send + 'a;
}

/// The acknowledgement of a batch handed over by [`Deliver::deliver`]: resolves `Ok` once every
/// effect of the batch is durable in the outside system. It makes progress without being
/// polled (the projection's own task or client does the work), so the runner can await it later.
pub type Delivery =
    std::pin::Pin<Box<dyn Future<Output = Result<(), ProjectionError>> + Send + 'static>>;

/// Why a projection could not apply an event.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProjectionError {
    /// The event could not be decoded.
    #[error("projection `{projection}` cannot decode event at position {position}")]
    Decode {
        /// The projection.
        projection: &'static str,
        /// The event's position.
        position: Position,
        /// Why.
        #[source]
        source: DecodeError,
    },
    /// A handler returned an error.
    #[error("projection `{projection}` failed on `{event_type}` at position {position}")]
    Handler {
        /// The projection.
        projection: &'static str,
        /// The event's type.
        event_type: String,
        /// The event's position.
        position: Position,
        /// The handler's error.
        #[source]
        source: HandlerError,
    },
    /// [`Projection::flush`] failed: the batch it ends was not committed.
    #[error("projection `{projection}` failed to flush a batch")]
    Flush {
        /// The projection.
        projection: &'static str,
        /// The error.
        #[source]
        source: HandlerError,
    },
    /// A system the projection delivers to outside its backend's transaction (a message broker,
    /// a remote service) failed or could not be reached, in a handler or a flush. Not the
    /// events' fault: the batch is not committed, the runner retries it with backoff and never
    /// offers it as a poison event to skip (skipping would drop the events for whoever the
    /// system serves), and its status shows [`FailureCause::Unavailable`](crate::subscription::FailureCause::Unavailable).
    #[error("projection `{projection}` cannot reach a system it delivers to")]
    Unavailable {
        /// The projection.
        projection: &'static str,
        /// The system's error.
        #[source]
        source: HandlerError,
    },
    /// A handler (or the upcaster decoding its event) panicked. The batch is abandoned like after
    /// a handler error; the runner stays alive and reports the failure at the event's position.
    #[error(
        "projection `{projection}` panicked on `{event_type}` at position {position}: {message}"
    )]
    Panicked {
        /// The projection.
        projection: &'static str,
        /// The event's type.
        event_type: String,
        /// The event's position.
        position: Position,
        /// The panic's message.
        message: String,
    },
}

impl ProjectionError {
    /// The position of the event that failed, if the failure belongs to one event (a flush
    /// failure belongs to the whole batch).
    pub fn position(&self) -> Option<Position> {
        match self {
            ProjectionError::Decode { position, .. }
            | ProjectionError::Handler { position, .. }
            | ProjectionError::Panicked { position, .. } => Some(*position),
            ProjectionError::Flush { .. } | ProjectionError::Unavailable { .. } => None,
        }
    }
}

/// What a handler may return: nothing, or a `Result` whose error converts into [`HandlerError`].
pub trait HandlerOutput {
    /// Normalizes the output.
    fn into_result(self) -> Result<(), HandlerError>;
}

impl HandlerOutput for () {
    fn into_result(self) -> Result<(), HandlerError> {
        Ok(())
    }
}

impl<E: Into<HandlerError>> HandlerOutput for Result<(), E> {
    fn into_result(self) -> Result<(), HandlerError> {
        self.map_err(Into::into)
    }
}

/// Which events a projection is fed: a filter on the stored event type and one on the stream
/// type (the category: for aggregates, [`Aggregate::TYPE`](crate::Aggregate::TYPE)). An event must
/// pass both.
///
/// The store reads by event type only ([`EventTypes`]); the stream-type filter is applied by the
/// runner to what it read. A projection of a few stream types over a log of many therefore reads
/// (and moves its checkpoint over) the others' events too: correct, at the cost of reading them.
/// Its lag and progress count every event of its event types, an upper bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Subscription {
    /// The stored event types fed to the projection.
    pub event_types: EventTypes<'static>,
    /// The stream types (categories) whose events are fed; `None`: every stream.
    pub stream_types: Option<&'static [&'static str]>,
}

impl Subscription {
    /// Every event of every stream.
    pub const ALL: Subscription = Subscription {
        event_types: EventTypes::All,
        stream_types: None,
    };

    /// Events of these stored types, from every stream.
    pub const fn types(types: &'static [&'static str]) -> Self {
        Subscription {
            event_types: EventTypes::Only(types),
            stream_types: None,
        }
    }

    /// Only the events of streams of these types (categories) that pass this filter.
    pub const fn in_streams(self, stream_types: &'static [&'static str]) -> Self {
        Subscription {
            event_types: self.event_types,
            stream_types: Some(stream_types),
        }
    }

    /// Whether `event` is fed to the projection.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        self.event_types.matches(&event.event_type)
            && self
                .stream_types
                .is_none_or(|types| types.contains(&event.stream.stream_type()))
    }
}
