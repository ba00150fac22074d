use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opened {}
#[derive(Default, Aggregate)]
#[aggregate(events(Opened))]
pub enum Account {
    #[default]
    New,
}

fn main() {}
