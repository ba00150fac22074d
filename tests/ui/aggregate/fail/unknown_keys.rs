use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opened {}
#[derive(Default, Aggregate)]
#[aggregate(naem = "account", events(Opened), colour = 3)]
pub struct Account {}

impl Apply<Opened> for Account {
    fn apply(&mut self, _: &Opened) {}
}

#[derive(Default, Aggregate)]
#[aggregate(events(Opened, "a closed account"))]
pub struct Ledger {}

impl Apply<Opened> for Ledger {
    fn apply(&mut self, _: &Opened) {}
}

fn main() {}
