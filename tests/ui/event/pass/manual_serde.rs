// An event serialized by hand: `#[event]` judges only the derives written below it, so these
// derives go above it.
use cqrs_core::prelude::*;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, PartialEq)]
#[event(name = "Tagged")]
pub struct Tagged(pub String);

impl Serialize for Tagged {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Tagged {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Tagged)
    }
}

fn main() {
    let tagged = Tagged::decode(1, &cqrs_core::RawJson::from_stored(r#""x""#)).unwrap();
    assert_eq!(tagged, Tagged("x".into()));
}
