use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opened {}
#[event]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Closed {}
pub struct Model;

#[projection]
impl Model {
    fn no_event(&mut self) {}
    fn two_events(&mut self, _: &Opened, _: &Closed) {}
    fn by_value(self, _: &Opened) {}
    fn shared(&self, _: &Opened) {}
    fn no_self(_: &Opened) {}
    fn mutable_event(&mut self, _: &mut Opened) {}
}

fn main() {}
