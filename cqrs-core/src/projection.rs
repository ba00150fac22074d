//! Projections: read models built from the global log.
//!
//! `#[projection]` on an impl block implements [`Projection`]: it routes each stored event to the
//! handler method whose event parameter has that type, and lists the handled types so the store
//! reads only those.

use std::error::Error as StdError;
use std::future::Future;

use crate::event::RecordedEvent;
use crate::stream::Position;
use crate::upcast::DecodeError;

/// A type-erased handler error.
pub type HandlerError = Box<dyn StdError + Send + Sync>;

/// A read model fed by events.
pub trait Projection: Send + 'static {
    /// Unique name; the key of its checkpoint.
    const NAME: &'static str;
    /// The stored type names this projection handles; every other event is skipped unread.
    const EVENT_TYPES: &'static [&'static str];
    /// What handlers get besides the event: `()` for in-memory read models, a database connection
    /// (e.g. `sqlx::PgConnection`) for read models that commit together with the checkpoint.
    type Context: Send;

    /// Applies one event. Events of types not in [`Projection::EVENT_TYPES`] are ignored.
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
            ProjectionError::Flush { .. } => None,
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
