use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opened {}

#[derive(Default)]
pub struct NoDiscard(Vec<u8>);

#[projection]
impl NoDiscard {
    fn opened(&mut self, _: &Opened) {
        self.0.push(1);
    }

    #[flush]
    fn write(&mut self) {}
}

#[derive(Default)]
pub struct BadShapes(Vec<u8>);

#[projection]
impl BadShapes {
    fn opened(&mut self, _: &Opened) {
        self.0.push(1);
    }

    #[flush]
    fn write(&self) {}

    #[flush]
    fn write_again(&mut self) {}

    #[discard]
    async fn forget(&mut self) {}
}

fn main() {}
