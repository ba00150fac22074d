//! Every attribute name and key the macros understand, in one place.

pub const AGGREGATE: &str = "aggregate";
pub const HELPER: &str = "helper";

pub const NAME: &str = "name";
pub const VERSION: &str = "version";
pub const UPCAST_FROM: &str = "upcast_from";
pub const UPCAST_JSON: &str = "upcast_json";
pub const CRATE: &str = "crate";
pub const EVENTS: &str = "events";
pub const EVENT_ENUM: &str = "event_enum";
pub const SNAPSHOT_VERSION: &str = "snapshot_version";
pub const CONTEXT: &str = "context";

pub const EVENT_KEYS: &[&str] = &[NAME, VERSION, UPCAST_FROM, UPCAST_JSON, CRATE];
pub const AGGREGATE_KEYS: &[&str] = &[NAME, EVENTS, EVENT_ENUM, SNAPSHOT_VERSION, CRATE];
pub const PROJECTION_KEYS: &[&str] = &[NAME, CONTEXT, CRATE];
