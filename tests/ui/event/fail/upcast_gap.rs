// An upcast chain with a gap: version 3 upcasts from a version-1 type.
use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event(name = "MoneyDeposited", version = 1)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoneyDepositedV1 {
    pub amount: i64,
}

#[event(name = "MoneyDeposited", version = 3, upcast_from = MoneyDepositedV1)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoneyDeposited {
    pub cents: i64,
}

impl From<MoneyDepositedV1> for MoneyDeposited {
    fn from(v1: MoneyDepositedV1) -> Self {
        MoneyDeposited { cents: v1.amount * 100 }
    }
}

fn main() {}
