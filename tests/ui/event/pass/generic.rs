// Generic events and aggregates get the bounds the generated code needs.
use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event(name = "ItemAdded")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemAdded<T> {
    pub item: T,
}

#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "basket", events(ItemAdded<String>))]
pub struct Basket<T> {
    items: Vec<T>,
}

impl<T: From<String>> Apply<ItemAdded<String>> for Basket<T> {
    fn apply(&mut self, event: &ItemAdded<String>) {
        self.items.push(T::from(event.item.clone()));
    }
}

fn main() {
    assert_eq!(<ItemAdded<u32> as Event>::NAME, "ItemAdded");
    let _ = Basket::<String>::default();
}
