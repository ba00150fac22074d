//! Key names and the checkpoint's encoding.

use cqrs_core::{Position, StoreError};

/// The keys of one backend: everything under its prefix.
#[derive(Debug, Clone)]
pub(crate) struct Keys {
    pub(crate) prefix: String,
}

impl Keys {
    pub(crate) fn checkpoint(&self, name: &str) -> String {
        format!("{}checkpoint:{name}", self.prefix)
    }

    pub(crate) fn lease(&self, name: &str) -> String {
        format!("{}lease:{name}", self.prefix)
    }

    pub(crate) fn skips(&self, name: &str) -> String {
        format!("{}skips:{name}", self.prefix)
    }

    pub(crate) fn failure(&self, name: &str) -> String {
        format!("{}failure:{name}", self.prefix)
    }
}

/// A position as stored: `<tx>.<sequence>`, decimal.
pub(crate) fn encode(position: Position) -> String {
    format!("{}.{}", position.tx, position.sequence)
}

/// The stored checkpoint; a value this backend did not write is [`StoreError::Backend`].
pub(crate) fn decode(key: &str, value: &str) -> Result<Position, StoreError> {
    let parsed = value
        .split_once('.')
        .and_then(|(tx, sequence)| Some(Position::new(tx.parse().ok()?, sequence.parse().ok()?)));
    parsed.ok_or_else(|| {
        StoreError::Backend(format!("key `{key}` holds `{value}`, not a checkpoint").into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_garbage_is_an_error() {
        let position = Position::new(u64::MAX, 7);
        assert_eq!(decode("k", &encode(position)).ok(), Some(position));
        for garbage in ["", "1", "1.", ".1", "a.b", "1.2.3", "-1.2"] {
            assert!(decode("k", garbage).is_err(), "{garbage:?}");
        }
    }
}
