use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opened {}

#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "account", events(Opened))]
pub struct Account;

impl Apply<Opened> for Account {
    fn apply(&mut self, _: &Opened) {}
}

/// Typed handlers narrowed to two stream types; everything else of those streams to `rest`.
#[derive(Default)]
pub struct Model {
    opened: u32,
    rest: u32,
}

#[projection(streams(Account, "ledger"))]
impl Model {
    fn on_opened(&mut self, _: &Opened) {
        self.opened += 1;
    }

    async fn rest(&mut self, _: &RecordedEvent, _: &mut ()) -> Result<(), std::io::Error> {
        self.rest += 1;
        Ok(())
    }
}

fn main() {
    assert_eq!(<Model as Projection>::EVENT_TYPES, ["Opened"]);
    assert_eq!(
        <Model as Projection>::SUBSCRIPTION,
        cqrs_core::Subscription::ALL.in_streams(&["account", "ledger"])
    );
}
