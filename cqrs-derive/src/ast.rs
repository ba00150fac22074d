//! The validated models expansion works on. Building one means every user error was reported.

use syn::{Ident, LitStr, Path, Type};

pub use crate::attr::StreamType;

/// A validated `#[event]`.
pub struct Event {
    pub krate: Path,
    pub name: LitStr,
    pub version: u32,
    pub upcast: Upcast,
    /// `Serialize` and/or `Deserialize` when the item's derives visibly lack them (an error);
    /// the fallback derives them, so that uses of the type add no errors of their own.
    pub missing_serde: Vec<&'static str>,
}

/// How an `#[event]` decodes versions older than its own.
pub enum Upcast {
    /// It cannot: older versions are `DecodeError::UnsupportedVersion`.
    None,
    /// `upcast_from = Prev`: decode as `Prev` (recursively), then `From<Prev>`.
    From(Type),
    /// `upcast_json = f`: rewrite the JSON with `f`, then deserialize as the current version.
    Json(Path),
}

/// A validated `#[derive(Aggregate)]`.
pub struct Aggregate {
    pub krate: Path,
    pub name: LitStr,
    pub events: Vec<AggregateEvent>,
    pub event_enum: Ident,
    pub snapshot_version: Option<u32>,
}

/// One listed event and the variant that carries it.
pub struct AggregateEvent {
    pub ty: Type,
    pub variant: Ident,
}

/// A validated `#[projection]`.
pub struct Projection {
    pub krate: Path,
    pub name: LitStr,
    /// `Projection::Context`: `context = Type`, else the handlers' `&mut C`, else `()`.
    pub context: Option<Type>,
    /// Every handler, the catch-all included (at most one, `Handler::catch_all`).
    pub handlers: Vec<Handler>,
    /// `streams(...)`: the stream types fed to the projection; empty for every stream.
    pub streams: Vec<StreamType>,
    /// The `#[flush]` method, if any.
    pub flush: Option<Flush>,
    /// The `#[discard]` method, if any.
    pub discard: Option<Ident>,
}

/// The `#[flush]` method: `fn method(&mut self [, ctx: &mut C])`, sync or async.
pub struct Flush {
    pub method: Ident,
    pub is_async: bool,
    pub takes_context: bool,
}

/// One handler method: `fn method(&mut self, event: &E [, meta: &RecordedEvent] [, ctx: &mut C])`.
pub struct Handler {
    pub method: Ident,
    pub is_async: bool,
    /// `E`, as written by the user (routing goes through `<E as Event>::NAME`); for the
    /// catch-all, the envelope type.
    pub event: Type,
    /// It takes `&RecordedEvent` as its event: it gets every event no other handler routes,
    /// undecoded.
    pub catch_all: bool,
    /// The `&RecordedEvent` parameter's type, if taken.
    pub meta: Option<Type>,
    /// The `&mut C` parameter's type, if taken.
    pub context: Option<Type>,
}
