use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opened {}
#[derive(Default, Aggregate)]
#[aggregate(naem = "account", events(Opened), colour = 3)]
pub struct Account {}

fn main() {}
