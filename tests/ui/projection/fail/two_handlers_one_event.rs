use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opened {}
pub type Alias = Opened;

#[derive(Default)]
pub struct Model;

#[projection]
impl Model {
    fn first(&mut self, _: &Opened) {}
    fn second(&mut self, _: &Alias) {}
}

fn main() {}
