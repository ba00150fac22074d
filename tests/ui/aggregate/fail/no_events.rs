use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Default, Aggregate)]
pub struct Account {}

fn main() {}
