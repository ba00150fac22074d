use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event(name = "Deposited", version = 1)]
#[derive(Serialize, Deserialize)]
pub struct DepositedV1 {}

#[event(name = "Deposited", version = 2, upcast_from = DepositedV1)]
#[derive(Serialize, Deserialize)]
pub struct Deposited {}

fn main() {}
