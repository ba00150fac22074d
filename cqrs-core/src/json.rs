//! [`RawJson`]: a stored event's payload or metadata as the JSON text the store holds, parsed only
//! when asked for.

use std::fmt;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

/// JSON text as a store returned it: the payload (and the metadata) of a
/// [`crate::RecordedEvent`].
///
/// Reading an event never parses its JSON: a backend hands over the text it already has, and
/// the text is parsed once, by whoever needs it, into the type they need:
/// [`decode`](Self::decode) deserializes straight into a typed value (no [`Value`] in between),
/// [`to_value`](Self::to_value) builds a [`Value`] for code that works on untyped JSON (a JSON
/// upcaster, a tool printing events), [`as_str`](Self::as_str) lends the text itself (to relay
/// it, or store it elsewhere, unparsed).
///
/// The text is shared: cloning a `RawJson` (and so a `RecordedEvent`, as the in-memory store's
/// reads and the projection runners' batches do) copies a pointer, not the JSON.
///
/// A `RawJson` made by [`encode`](Self::encode) or from a [`Value`] holds valid JSON. One made
/// from a store's text holds what was stored, which the backend does not re-check on read (every
/// backend validated it when it was written): if storage was corrupted, the text may be anything,
/// and decoding it fails with a typed error, never a panic.
///
/// Equality compares the text: two `RawJson` of the same JSON written differently (key order,
/// spacing, as a database may normalize it) are not equal; compare [`to_value`](Self::to_value)s
/// for that.
///
/// ```
/// use cqrs_core::RawJson;
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct Deposited { amount: i64 }
///
/// let json = RawJson::from_stored(r#"{"amount":5}"#);
/// assert_eq!(json.decode::<Deposited>().unwrap().amount, 5);
/// assert_eq!(json.as_str(), r#"{"amount":5}"#);
/// assert_eq!(json.to_value().unwrap()["amount"], 5);
/// assert!(RawJson::from_stored("{not json").decode::<Deposited>().is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct RawJson(Arc<str>);

impl RawJson {
    /// Wraps the JSON text a store returned, unchecked: it was validated when written, and
    /// whatever reads it parses it anyway and reports text that is not JSON as an error.
    pub fn from_stored(text: impl Into<Arc<str>>) -> Self {
        Self(text.into())
    }

    /// Serializes `value` as JSON text.
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self, serde_json::Error> {
        serde_json::to_string(value).map(Self::from_stored)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Deserializes the text straight into `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(&self.0)
    }

    /// Parses the text into a [`Value`], for code that works on untyped JSON.
    pub fn to_value(&self) -> Result<Value, serde_json::Error> {
        serde_json::from_str(&self.0)
    }
}

impl From<&Value> for RawJson {
    fn from(value: &Value) -> Self {
        // A `Value` always prints as valid JSON (its `Display` cannot fail).
        Self::from_stored(value.to_string())
    }
}

impl From<Value> for RawJson {
    fn from(value: Value) -> Self {
        Self::from(&value)
    }
}

impl AsRef<str> for RawJson {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The text itself, as [`as_str`](RawJson::as_str) gives it.
impl fmt::Display for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RawJson {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("RawJson").field(&&*self.0).finish()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use serde_json::json;

    #[test]
    fn a_value_round_trips_through_the_text() {
        let value = json!({ "a": [1, 2.5, "x\u{1}"], "b": null, "c": { "d": true } });
        let raw = RawJson::from(&value);
        assert_eq!(raw.to_value().unwrap(), value);
        assert_eq!(RawJson::encode(&value).unwrap(), raw);
    }

    #[test]
    fn text_that_is_not_json_is_an_error_not_a_panic() {
        for text in ["", "{", "nul", "{\"a\":1}}", "\u{0}"] {
            let raw = RawJson::from_stored(text);
            assert!(raw.to_value().is_err(), "{text:?}");
            assert!(raw.decode::<Value>().is_err(), "{text:?}");
            assert_eq!(raw.as_str(), text);
        }
    }

    #[test]
    fn clones_share_the_text() {
        let raw = RawJson::from_stored("{\"big\":\"".to_owned() + &"x".repeat(1000) + "\"}");
        let copy = raw.clone();
        assert!(std::ptr::eq(raw.as_str(), copy.as_str()));
    }
}
