//! The framework under another name: this crate depends on `cqrs-core` as `cqrs` and has no
//! `cqrs_core` at all, so the generated code compiles only if it follows `crate = ::cqrs`.

use cqrs::prelude::*;
use serde::{Deserialize, Serialize};

/// A ping was received.
#[cqrs::event(crate = ::cqrs, name = "Pinged", version = 2, upcast_from = PingedV1)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pinged {
    /// Who pinged.
    pub from: String,
}

/// The first version, without a sender.
#[cqrs::event(crate = ::cqrs, name = "Pinged")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PingedV1 {}

impl From<PingedV1> for Pinged {
    fn from(_: PingedV1) -> Self {
        Self {
            from: "unknown".to_owned(),
        }
    }
}

/// Counts pings.
#[derive(Debug, Default, Aggregate)]
#[aggregate(crate = ::cqrs, name = "pinger", events(Pinged))]
pub struct Pinger {
    /// Pings so far.
    pub pings: u32,
}

impl Apply<Pinged> for Pinger {
    fn apply(&mut self, _: &Pinged) {
        self.pings += 1;
    }
}

/// Who pinged, in order.
#[derive(Debug, Default)]
pub struct Senders {
    /// The senders.
    pub from: Vec<String>,
}

#[cqrs::projection(crate = ::cqrs, name = "senders")]
impl Senders {
    fn pinged(&mut self, event: &Pinged) {
        self.from.push(event.from.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs::{EventSet, InMemoryStore, Repository};

    #[tokio::test]
    async fn generated_code_goes_through_the_renamed_crate() {
        // v1 payloads upcast through the chain.
        let old = PingerEvent::decode("Pinged", 1, &cqrs::RawJson::from_stored("{}")).unwrap();
        assert_eq!(
            old,
            PingerEvent::Pinged(Pinged {
                from: "unknown".into()
            })
        );

        let repository = Repository::<Pinger>::new(InMemoryStore::new());
        let loaded = repository.load("p").await.unwrap();
        assert_eq!(loaded.state.pings, 0);
        assert_eq!(<Senders as cqrs::Projection>::EVENT_TYPES, ["Pinged"]);
        assert_eq!(<Pinger as cqrs::Aggregate>::TYPE, "pinger");
    }
}
