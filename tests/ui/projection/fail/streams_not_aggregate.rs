use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opened {}

#[derive(Default)]
pub struct Model;

#[projection(streams(Opened, "ledger"))]
impl Model {
    fn any(&mut self, _: &RecordedEvent) {}
}

fn main() {}
