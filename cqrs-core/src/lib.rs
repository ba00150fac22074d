//! # cqrs-core
//!
//! Event sourcing and CQRS for Rust. Annotate plain domain types; the macros generate the
//! plumbing. This crate holds the model (events, aggregates, commands, projections), the runtime
//! that executes commands and runs projections, the storage traits every backend implements, and
//! an in-memory backend. Durable storage comes from a backend crate: `cqrs-sqlite` (embedded, one
//! file) or `cqrs-postgres` (a server).
//!
//! # The journey of an event
//!
//! 1. A **command** names an aggregate instance by its id. [`Repository::execute`] loads the
//!    aggregate's state by folding its stream's events (after the latest snapshot, if any) through
//!    your [`Apply`] impls.
//! 2. The aggregate **decides**: its [`Handle<C>`](Handle) impl returns the events the command
//!    produces, or a typed domain error ([`ExecuteError::Domain`]). Deciding is pure; a decision
//!    that needs services (a clock, a uniqueness check) implements [`HandleWith`].
//! 3. The events are **appended** with the version the state was loaded at
//!    ([`ExpectedVersion::Exact`]): a concurrent writer makes the append fail with a conflict,
//!    which a [`RetryPolicy`] can retry with a fresh decision. Each event gets a version in its
//!    stream and a [`Position`] in the global log; inline projections commit in the same
//!    transaction.
//! 4. **Projections** build read models from the global log: a [`ProjectionRunner`] reads it
//!    after the projection's checkpoint ([`EventStore::read_all`] never skips an event), calls the
//!    `#[projection]` handlers, and moves the checkpoint with each batch.
//! 5. **Queries** read read models, never aggregates. A client that just wrote waits for the read
//!    model to reach its write's position ([`ProjectionHandle::wait_for`]).
//!
//! Old events are upcast on read ([`upcast`]); snapshots shorten loads ([`snapshot`]).
//!
//! # Example
//!
//! An account that refuses to go negative, and a read model of balances, in memory:
//!
//! ```
//! use std::collections::BTreeMap;
//! use std::time::Duration;
//!
//! use cqrs_core::prelude::*;
//! use cqrs_core::subscription::InProcess;
//! use cqrs_core::ExecuteError;
//! use serde::{Deserialize, Serialize};
//!
//! // Events: plain structs with a stable stored name.
//! #[event(name = "MoneyDeposited")]
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! pub struct MoneyDeposited { pub amount: i64 }
//!
//! #[event(name = "MoneyWithdrawn")]
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! pub struct MoneyWithdrawn { pub amount: i64 }
//!
//! // The aggregate: only the state decisions need. The derive generates `AccountEvent`.
//! #[derive(Debug, Default, Aggregate)]
//! #[aggregate(name = "account", events(MoneyDeposited, MoneyWithdrawn))]
//! pub struct Account { balance: i64 }
//!
//! impl Apply<MoneyDeposited> for Account {
//!     fn apply(&mut self, e: &MoneyDeposited) { self.balance += e.amount }
//! }
//! impl Apply<MoneyWithdrawn> for Account {
//!     fn apply(&mut self, e: &MoneyWithdrawn) { self.balance -= e.amount }
//! }
//!
//! // Commands, and the decisions they make.
//! pub struct Deposit { pub amount: i64 }
//! pub struct Withdraw { pub amount: i64 }
//!
//! #[derive(Debug, PartialEq, thiserror::Error)]
//! #[error("insufficient funds: balance {balance}, requested {requested}")]
//! pub struct InsufficientFunds { balance: i64, requested: i64 }
//!
//! impl Handle<Deposit> for Account {
//!     type Error = std::convert::Infallible;
//!     fn handle(&self, cmd: &Deposit) -> Result<Vec<AccountEvent>, Self::Error> {
//!         Ok(vec![MoneyDeposited { amount: cmd.amount }.into()])
//!     }
//! }
//!
//! impl Handle<Withdraw> for Account {
//!     type Error = InsufficientFunds;
//!     fn handle(&self, cmd: &Withdraw) -> Result<Vec<AccountEvent>, InsufficientFunds> {
//!         if cmd.amount > self.balance {
//!             return Err(InsufficientFunds { balance: self.balance, requested: cmd.amount });
//!         }
//!         Ok(vec![MoneyWithdrawn { amount: cmd.amount }.into()])
//!     }
//! }
//!
//! // A read model: handlers are routed by their event parameter's type.
//! #[derive(Debug, Default)]
//! pub struct Balances { by_account: BTreeMap<String, i64> }
//!
//! #[projection(name = "balances")]
//! impl Balances {
//!     fn deposited(&mut self, e: &MoneyDeposited, meta: &RecordedEvent) {
//!         *self.by_account.entry(meta.stream.id().to_owned()).or_default() += e.amount;
//!     }
//!     fn withdrawn(&mut self, e: &MoneyWithdrawn, meta: &RecordedEvent) {
//!         *self.by_account.entry(meta.stream.id().to_owned()).or_default() -= e.amount;
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let store = InMemoryStore::new();
//!     let accounts = Repository::<Account>::new(store.clone()).with_retry(RetryPolicy::retries(3));
//!
//!     // The runner catches up, then follows new appends until stopped.
//!     let balances = ProjectionRunner::new(Balances::default(), InProcess::new(store.clone())).spawn();
//!
//!     accounts.execute("acc-1", &Deposit { amount: 100 }).await?;
//!     let written = accounts.execute("acc-1", &Withdraw { amount: 30 }).await?;
//!     let refused = accounts.execute("acc-1", &Withdraw { amount: 500 }).await;
//!     assert!(matches!(refused, Err(ExecuteError::Domain(InsufficientFunds { balance: 70, .. }))));
//!
//!     // Read-your-own-writes: wait until the read model has applied the withdrawal.
//!     let position = written.position.expect("the withdrawal wrote an event");
//!     balances.wait_for(position, Duration::from_secs(5)).await?;
//!
//!     let read_model = balances.stop().await.expect("the runner did not panic");
//!     assert_eq!(read_model.by_account["acc-1"], 70);
//!     Ok(())
//! }
//! ```
//!
//! Swap [`InMemoryStore`] for `cqrs_sqlite::SqliteStore` or `cqrs_postgres::PostgresStore` and
//! [`InProcess`](subscription::InProcess) for their projection backends to keep everything.
//!
//! # Modules
//!
//! In the order of the journey: [`aggregate`] (state + decisions) → [`command`] (load, decide,
//! append) → [`store`] (the log) → [`projection`](mod@projection) (read models) →
//! [`subscription`] (runs projections over the log). [`event`](mod@event) and [`upcast`] define
//! what is stored and how old versions are read; [`snapshot`] and [`checkpoint`] shorten loads and
//! track projections; [`bus`] routes commands by type; [`stream`] holds ids, versions and
//! positions; [`memory`] is the in-memory backend; [`backend`] is for authors of storage backends
//! only. [`prelude`] has the names most programs need.
//!
//! # Features
//!
//! - `derive` (default): re-exports the macros `#[event]`, `#[derive(Aggregate)]` and
//!   `#[projection]`.
//! - `testing`: given/when/then fixtures (`cqrs_core::testing`); enable it in your
//!   `[dev-dependencies]`.
//! - `conformance`: the test suite every storage backend runs (`cqrs_core::conformance`).
#![forbid(unsafe_code)]

pub mod admin;
pub mod aggregate;
pub mod backend;
pub mod bus;
pub mod checkpoint;
pub mod command;
#[cfg(feature = "conformance")]
pub mod conformance;
pub mod event;
pub mod json;
pub mod memory;
pub mod metrics;
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
    UndecodableEvent, DEFAULT_CACHE_CAPACITY, DEFAULT_LOAD_BATCH_SIZE,
};
pub use event::{
    EncodeError, Event, EventId, EventSet, Metadata, NewEvent, RecordedEvent, ReplayEvent,
};
pub use json::RawJson;
pub use memory::InMemoryStore;
pub use projection::{Deliver, Delivery, HandlerError, Projection, ProjectionError, Subscription};
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

    pub use crate::json::RawJson;
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
        payload: &RawJson,
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
    /// (`#[event(upcast_json = f)]`), then deserializing the result as the current version. The
    /// one decode path that parses into a `Value`: the upcaster works on one.
    pub fn upcast_json<E: Event>(
        schema_version: u32,
        payload: &RawJson,
        upcaster: fn(u32, serde_json::Value) -> JsonUpcastResult,
    ) -> Result<E, DecodeError> {
        let stored = payload.to_value().map_err(|source| DecodeError::Payload {
            event_type: E::NAME.to_owned(),
            version: schema_version,
            source,
        })?;
        match upcaster(schema_version, stored) {
            Ok(current) => crate::upcast::deserialize_value(E::NAME, E::VERSION, &current),
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

    /// The first event before `names[index]` stored under the same name, if any. The generated
    /// name check calls it once per event, so it stays linear in the number of events.
    pub const fn first_clash(names: &[&str], index: usize) -> Option<usize> {
        let mut i = 0;
        while i < index {
            if str_eq(names[i], names[index]) {
                return Some(i);
            }
            i += 1;
        }
        None
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
