use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event(name = "Happened")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct One {}

#[event(name = "Happened")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Two {}

#[derive(Default, Aggregate)]
#[aggregate(events(One, Two))]
pub struct Thing {}

impl Apply<One> for Thing {
    fn apply(&mut self, _: &One) {}
}
impl Apply<Two> for Thing {
    fn apply(&mut self, _: &Two) {}
}

fn main() {}
