//! Every attribute name and key the macros understand, in one place: the whole grammar on one
//! screen.
//!
//! ```text
//! #[event(name = "MoneyDeposited", version = 2, upcast_from = DepositedV1 | upcast_json = path::to::f, crate = path)]
//! #[aggregate(name = "account", events(A, b::B as BeeVariant), event_enum = Name, snapshot_version = 2, crate = path)]
//! #[projection(name = "balances", context = Type, streams(Account, "ledger"), crate = path)]
//!     // methods: handlers (`event: &E`, or `event: &RecordedEvent` for every other event),
//!     // #[helper] to opt out, #[flush] + #[discard] to batch writes
//! ```

/// The derive's helper attribute: `#[aggregate(...)]`.
pub const AGGREGATE: &str = "aggregate";
/// Marks a method of a `#[projection]` impl block as an ordinary method, not a handler.
pub const HELPER: &str = "helper";
/// Marks the method of a `#[projection]` impl block that writes what handlers buffered.
pub const FLUSH: &str = "flush";
/// Marks the method of a `#[projection]` impl block that drops what handlers buffered.
pub const DISCARD: &str = "discard";

pub const NAME: &str = "name";
pub const VERSION: &str = "version";
pub const UPCAST_FROM: &str = "upcast_from";
pub const UPCAST_JSON: &str = "upcast_json";
pub const CRATE: &str = "crate";
pub const EVENTS: &str = "events";
pub const EVENT_ENUM: &str = "event_enum";
pub const SNAPSHOT_VERSION: &str = "snapshot_version";
pub const CONTEXT: &str = "context";
pub const STREAMS: &str = "streams";

pub const EVENT_KEYS: &[&str] = &[NAME, VERSION, UPCAST_FROM, UPCAST_JSON, CRATE];
pub const AGGREGATE_KEYS: &[&str] = &[NAME, EVENTS, EVENT_ENUM, SNAPSHOT_VERSION, CRATE];
pub const PROJECTION_KEYS: &[&str] = &[NAME, CONTEXT, STREAMS, CRATE];

/// `#[derive(...)]`, read by `#[event]` to check for the two below.
pub const DERIVE: &str = "derive";
/// The derives `Event` needs (its supertraits), by their last path segment.
pub const SERIALIZE: &str = "Serialize";
pub const DESERIALIZE: &str = "Deserialize";

/// The envelope type a handler's optional second parameter must name; as the first (event)
/// parameter it makes the handler a catch-all.
pub const RECORDED_EVENT: &str = "RecordedEvent";
