//! # cqrs-core
//!
//! Event sourcing and CQRS for Rust. Annotate plain domain types; the macros generate the plumbing.
//!
//! The journey of an event, module by module:
//! [`aggregate`] (state + decisions) → [`command`] (load, decide, append) → [`store`] (the log)
//! → [`projection`](mod@projection) (read models) → queries. [`event`](mod@event) and [`upcast`] define what is stored and how
//! old versions are read; [`snapshot`] and [`checkpoint`] shorten loads and track projections;
//! [`subscription`] runs projections over the log; [`memory`] is the in-memory backend;
//! [`backend`] is for authors of storage backends. Behind features: `testing` (given/when/then
//! fixtures, `cqrs_core::testing`) and `conformance` (the test suite every backend runs).
#![forbid(unsafe_code)]

pub mod aggregate;
pub mod backend;
pub mod bus;
pub mod checkpoint;
pub mod command;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod event;
pub mod memory;
pub mod projection;
pub mod snapshot;
pub mod store;
pub mod stream;
pub mod subscription;
#[cfg(feature = "testing")]
pub mod testing;
pub mod upcast;

pub use aggregate::{Aggregate, Apply, Command, Handle, HandleWith};
pub use bus::{BusError, CommandBus, CommandHandler, DomainError, Receipt};
pub use checkpoint::CheckpointStore;
pub use command::{
    CommandContext, CommandOutcome, ExecuteError, LoadError, Loaded, Repository, RetryPolicy,
    UndecodableEvent,
};
pub use event::{EncodeError, Event, EventId, EventSet, Metadata, NewEvent, RecordedEvent};
pub use memory::InMemoryStore;
pub use projection::{HandlerError, Projection, ProjectionError, Subscription};
pub use snapshot::{Snapshot, SnapshotPolicy, SnapshotStore};
pub use store::{AppendResult, ConcurrencyError, EventStore, EventTypes, StoreError};
pub use stream::{ExpectedVersion, Position, StreamId, StreamVersion};
pub use subscription::{ProjectionHandle, ProjectionRunner, RunnerConfig};
pub use upcast::DecodeError;

#[cfg(feature = "derive")]
pub use cqrs_derive::{event, projection, Aggregate};

/// The names most programs need: `use cqrs_core::prelude::*;`.
pub mod prelude {
    pub use crate::{
        Aggregate, Apply, Command, CommandBus, CommandContext, Event, EventStore, ExpectedVersion,
        Handle, HandleWith, InMemoryStore, Position, Projection, ProjectionRunner, RecordedEvent,
        Repository, RetryPolicy, RunnerConfig, SnapshotPolicy, SnapshotStore, StreamId,
        StreamVersion,
    };

    #[cfg(feature = "derive")]
    pub use crate::{event, projection};
    // `Aggregate` (the derive) comes with the trait of the same name above.
}

/// Paths and helpers the macros' generated code uses. Not public API: may change in any release.
///
/// Generated code names everything through this module (`::cqrs_core::__private::…`), so it
/// compiles whatever the user's scope shadows.
#[doc(hidden)]
pub mod __private {
    pub use ::core;
    pub use ::core::result::Result;
    pub use ::core::result::Result::{Err, Ok};
    pub use ::serde;
    pub use ::serde_json;
    pub use ::std;

    pub use crate::projection::HandlerOutput;
    pub use crate::upcast::{deserialize, JsonUpcastResult};

    use crate::event::{Event, RecordedEvent};
    use crate::projection::{Projection, ProjectionError};
    use crate::upcast::DecodeError;

    /// `schema_version` has no decode path for `E`.
    pub fn unsupported_version<E: Event>(schema_version: u32) -> DecodeError {
        DecodeError::UnsupportedVersion {
            event_type: E::NAME.to_owned(),
            version: schema_version,
            current: E::VERSION,
        }
    }

    /// Decodes an older payload of `E` as `Prev` (`#[event(upcast_from = Prev)]`), for the caller
    /// to convert. A version that `Prev`'s chain cannot decode either is reported against `E`, so
    /// the error names the current version, not `Prev`'s.
    pub fn decode_older<E: Event, Prev: Event>(
        schema_version: u32,
        payload: &serde_json::Value,
    ) -> Result<Prev, DecodeError> {
        match Prev::decode(schema_version, payload) {
            Err(DecodeError::UnsupportedVersion { .. }) => {
                Err(unsupported_version::<E>(schema_version))
            }
            decoded => decoded,
        }
    }

    /// `event_type` names no event of the set.
    pub fn unknown_event_type(event_type: &str) -> DecodeError {
        DecodeError::UnknownEventType {
            event_type: event_type.to_owned(),
        }
    }

    /// Decodes an older payload of `E` by rewriting its JSON with the user's upcaster
    /// (`#[event(upcast_json = f)]`), then deserializing the result as the current version.
    pub fn upcast_json<E: Event>(
        schema_version: u32,
        payload: &serde_json::Value,
        upcaster: fn(u32, serde_json::Value) -> JsonUpcastResult,
    ) -> Result<E, DecodeError> {
        match upcaster(schema_version, payload.clone()) {
            Ok(current) => deserialize(E::NAME, E::VERSION, &current),
            Err(source) => Err(DecodeError::Upcast {
                event_type: E::NAME.to_owned(),
                from_version: schema_version,
                source,
            }),
        }
    }

    /// Decodes a stored event for projection `P`'s handler of `E`.
    pub fn decode_for<P: Projection, E: Event>(
        event: &RecordedEvent,
    ) -> Result<E, ProjectionError> {
        E::decode(event.schema_version, &event.payload).map_err(|source| ProjectionError::Decode {
            projection: P::NAME,
            position: event.position,
            source,
        })
    }

    /// What projection `P`'s handler receives: the event `decoded` from `event` (through
    /// `<E as Event>::decode`, so that a type that is not an event is reported at the handler's
    /// parameter), or the decoding failure with its position.
    pub fn decoded<P: Projection, E>(
        event: &RecordedEvent,
        decoded: Result<E, DecodeError>,
    ) -> Result<E, ProjectionError> {
        decoded.map_err(|source| ProjectionError::Decode {
            projection: P::NAME,
            position: event.position,
            source,
        })
    }

    /// Normalizes what projection `P`'s `#[flush]` method returned (`()` or `Result<(), E>`).
    pub fn flushed<P: Projection>(output: impl HandlerOutput) -> Result<(), ProjectionError> {
        output
            .into_result()
            .map_err(|source| ProjectionError::Flush {
                projection: P::NAME,
                source,
            })
    }

    /// Normalizes what projection `P`'s handler returned (`()` or `Result<(), E>`).
    pub fn handled<P: Projection>(
        event: &RecordedEvent,
        output: impl HandlerOutput,
    ) -> Result<(), ProjectionError> {
        output
            .into_result()
            .map_err(|source| ProjectionError::Handler {
                projection: P::NAME,
                event_type: event.event_type.clone(),
                position: event.position,
                source,
            })
    }

    /// Compile-time check that `names[index]` differs from every name before it; on a clash with
    /// `names[i]`, fails with `clashes[i]`, at the caller's span (the later event's tokens). One
    /// call per event keeps the generated check linear in the number of events.
    #[track_caller]
    pub const fn assert_unique_name(names: &[&str], index: usize, clashes: &[&str]) {
        let mut i = 0;
        while i < index {
            if str_eq(names[i], names[index]) {
                panic!("{}", clashes[i]);
            }
            i += 1;
        }
    }

    /// String equality usable in constants (compile-time checks of stored names).
    pub const fn str_eq(a: &str, b: &str) -> bool {
        let (a, b) = (a.as_bytes(), b.as_bytes());
        if a.len() != b.len() {
            return false;
        }
        let mut i = 0;
        while i < a.len() {
            if a[i] != b[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}
