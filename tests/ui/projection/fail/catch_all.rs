use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Opened {}

#[derive(Default)]
pub struct Model;

#[projection]
impl Model {
    fn first(&mut self, _: &RecordedEvent) {}
    fn second(&mut self, _: &RecordedEvent) {}
    fn twice(&mut self, _: &RecordedEvent, _: &RecordedEvent) {}
    fn mutable(&mut self, _: &mut RecordedEvent) {}
}

#[derive(Default)]
pub struct Streams;

#[projection(streams())]
impl Streams {
    fn any(&mut self, _: &RecordedEvent) {}
}

#[derive(Default)]
pub struct Names;

#[projection(streams = "account")]
impl Names {
    fn any(&mut self, _: &RecordedEvent) {}
}

#[derive(Default)]
pub struct NotAnAggregate;

#[projection(streams(Opened, ""))]
impl NotAnAggregate {
    fn any(&mut self, _: &RecordedEvent) {}
}

fn main() {}
