use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event(name = "Paid", version = 1)]
#[derive(Serialize, Deserialize)]
pub struct PaidV1 {}

#[event(name = "Deposited", version = 2, upcast_from = PaidV1)]
#[derive(Serialize, Deserialize)]
pub struct Deposited {}

impl From<PaidV1> for Deposited {
    fn from(_: PaidV1) -> Self {
        Deposited {}
    }
}

fn main() {}
