// The bank's events. Shared by the trybuild cases: see README.md.
use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event(name = "AccountOpened")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountOpened {
    pub owner: String,
}

#[event(name = "MoneyDeposited")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoneyDeposited {
    pub amount: i64,
}

#[event(name = "MoneyWithdrawn")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoneyWithdrawn {
    pub amount: i64,
}

#[event(name = "AccountClosed")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountClosed {}
