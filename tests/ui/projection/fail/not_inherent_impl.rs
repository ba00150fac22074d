use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opened {}
pub struct Model;

#[projection]
pub fn not_an_impl() {}

#[projection]
impl Default for Model {
    fn default() -> Self {
        Model
    }
}

fn main() {}
