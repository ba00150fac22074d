use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event(version = 0)]
#[derive(Serialize, Deserialize)]
pub struct Zero {}

#[event(version = "2")]
#[derive(Serialize, Deserialize)]
pub struct Text {}

#[event(verison = 2, name = "")]
#[derive(Serialize, Deserialize)]
pub struct Typo {}

#[event("Keyless", version = 2)]
#[derive(Serialize, Deserialize)]
pub struct Keyless {}

#[event(name("Called"), version 2)]
#[derive(Serialize, Deserialize)]
pub struct Called {}

fn main() {}
