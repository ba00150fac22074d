use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

mod a {
    #[cqrs_core::event(name = "a.Created")]
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct Created {}
}
mod b {
    #[cqrs_core::event(name = "b.Created")]
    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct Created {}
}

#[derive(Default, Aggregate)]
#[aggregate(events(a::Created, b::Created))]
pub struct Thing {}

fn main() {}
