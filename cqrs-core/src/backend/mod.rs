//! For authors of storage backends: everything every backend must agree on, so that a backend is
//! SQL plus row decoding and the core supplies the rest.
//!
//! Users of the framework never need this module: they use the storage traits
//! ([`EventStore`](crate::EventStore), [`SnapshotStore`](crate::SnapshotStore),
//! [`CheckpointStore`](crate::CheckpointStore)), the [`ProjectionRunner`](crate::subscription::ProjectionRunner)
//! and a backend's constructors.
//!
//! A backend:
//!
//! - **validates first**, on every path: [`validate_append`] before an append,
//!   [`validate_snapshot`] before a snapshot, `StreamId::validate` before a stream read,
//!   [`validate_types`] before a filtered read or count, [`validate_checkpoint_name`] for every
//!   checkpoint (or consumer) name. All backends then reject the same input with the same error.
//! - **decides idempotent retries with [`resolve_retry`]**: when some of a batch's event ids are
//!   already stored (a unique-index violation, or a lookup before writing), it reads where they are
//!   ([`StoredEventRef`]) and lets the core decide between the original result and a conflict.
//!   Stored ids are looked at before the expected version: a retry of a stored batch succeeds
//!   whatever the stream's version is now.
//! - **runs projection handlers through [`apply_batch`]** (for a projection backend and for inline
//!   projections): every event through [`handle_event`], which turns a panic into an error at the
//!   event's position, then [`Projection::flush`](crate::Projection::flush) once for a non-empty
//!   batch, and [`Projection::discard`](crate::Projection::discard) when anything failed.
//! - **implements [`ProjectionBackend`]**: a batch's read-model writes and its checkpoint
//!   compare-and-set commit as one atomic unit, and a [`Lease`] keeps one active runner per
//!   projection.
//! - **passes the conformance suite** (`cqrs_core::conformance`, behind the `conformance`
//!   feature): `backend_conformance_tests!` for the storage traits and
//!   `projection_conformance_tests!` for the projection backend.

mod inline;
mod projection;
mod retry;
mod validate;

pub use inline::InlineProjections;
pub(crate) use projection::panic_message;
pub use projection::{
    apply_batch, check_promotion, finish_batch, flush_batch, handle_event, handler_failure,
    BatchError, BatchTransaction, Lease, ProjectionBackend, SkipTarget,
};
pub use retry::{resolve_retry, StoredEventRef};
pub use validate::{
    validate_append, validate_checkpoint_name, validate_json, validate_snapshot, validate_types,
};
