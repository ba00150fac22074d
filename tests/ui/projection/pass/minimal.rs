use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opened {}
#[event]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Closed {}
#[derive(Default)]
pub struct Model {
    opened: u32,
}

#[projection]
impl Model {
    fn on_opened(&mut self, _: &Opened) {
        self.opened += 1;
    }
}

fn main() {}
