use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event(name = "Deposited", version = 2)]
#[derive(Serialize, Deserialize)]
pub struct DepositedV2 {}

#[event(name = "Deposited", version = 2, upcast_from = DepositedV2)]
#[derive(Serialize, Deserialize)]
pub struct Deposited {}

impl From<DepositedV2> for Deposited {
    fn from(_: DepositedV2) -> Self {
        Deposited {}
    }
}

fn main() {}
