//! Orders: create, add items, submit. No edits after submit, no empty order. Three read models
//! from the same events, and a V1 event written by an "old release" read as V2.

use std::collections::{BTreeMap, BTreeSet};

use chrono::NaiveDate;
use cqrs_core::prelude::*;
use cqrs_core::{event, projection};
use serde::{Deserialize, Serialize};

/// An order was created for a customer.
#[event(name = "OrderCreated")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderCreated {
    /// The customer's id.
    pub customer: String,
    /// The customer's display name (searchable).
    pub customer_name: String,
}

/// Version 1 of `ItemAdded`, as the old release stored it: a bare price in cents, no currency.
#[event(name = "ItemAdded", version = 1)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemAddedV1 {
    /// Product code.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Unit price in cents (implicitly EUR in the old release).
    pub price: i64,
}

/// An item was added (version 2: the price carries its currency).
#[event(name = "ItemAdded", version = 2, upcast_from = ItemAddedV1)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemAdded {
    /// Product code.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Unit price.
    pub unit_price: Money,
}

/// An amount of money.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    /// Minor units (cents).
    pub cents: i64,
    /// ISO currency code.
    pub currency: String,
}

impl From<ItemAddedV1> for ItemAdded {
    fn from(v1: ItemAddedV1) -> Self {
        ItemAdded {
            sku: v1.sku,
            quantity: v1.quantity,
            unit_price: Money {
                cents: v1.price,
                currency: "EUR".to_owned(),
            },
        }
    }
}

/// The order was submitted; it can no longer change.
#[event(name = "OrderSubmitted")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderSubmitted {
    /// Order total in cents.
    pub total_cents: i64,
}

/// An order.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, Aggregate)]
#[aggregate(name = "order", events(OrderCreated, ItemAdded, OrderSubmitted))]
pub struct Order {
    /// Whether it was created.
    pub created: bool,
    /// Whether it was submitted.
    pub submitted: bool,
    /// Items: sku to (quantity, unit price in cents).
    pub items: BTreeMap<String, (u32, i64)>,
}

impl Order {
    fn total(&self) -> i64 {
        self.items.values().map(|(q, p)| i64::from(*q) * p).sum()
    }
}

impl Apply<OrderCreated> for Order {
    fn apply(&mut self, _: &OrderCreated) {
        self.created = true;
    }
}

impl Apply<ItemAdded> for Order {
    fn apply(&mut self, e: &ItemAdded) {
        let line = self
            .items
            .entry(e.sku.clone())
            .or_insert((0, e.unit_price.cents));
        line.0 += e.quantity;
        line.1 = e.unit_price.cents;
    }
}

impl Apply<OrderSubmitted> for Order {
    fn apply(&mut self, _: &OrderSubmitted) {
        self.submitted = true;
    }
}

/// Why an order command is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// Creating an order twice.
    #[error("order already exists")]
    AlreadyExists,
    /// The order does not exist.
    #[error("order does not exist")]
    NotFound,
    /// The order was submitted and cannot change.
    #[error("order is submitted and can no longer be edited")]
    OrderNotEditable,
    /// Submitting an order without items.
    #[error("cannot submit an empty order")]
    EmptyOrder,
    /// Zero quantity or non-positive price.
    #[error("invalid item: {0}")]
    InvalidItem(String),
}

/// Create an order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateOrder {
    /// Order id.
    pub order: String,
    /// Customer id.
    pub customer: String,
    /// Customer name.
    pub customer_name: String,
}

/// Add an item.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddItem {
    /// Order id.
    pub order: String,
    /// Product code.
    pub sku: String,
    /// How many.
    pub quantity: u32,
    /// Unit price in cents (EUR).
    pub price_cents: i64,
}

/// Submit the order.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SubmitOrder {
    /// Order id.
    pub order: String,
}

impl Handle<CreateOrder> for Order {
    type Error = OrderError;
    fn handle(&self, c: &CreateOrder) -> Result<Vec<OrderEvent>, OrderError> {
        if self.created {
            return Err(OrderError::AlreadyExists);
        }
        Ok(vec![OrderCreated {
            customer: c.customer.clone(),
            customer_name: c.customer_name.clone(),
        }
        .into()])
    }
}

impl Handle<AddItem> for Order {
    type Error = OrderError;
    fn handle(&self, c: &AddItem) -> Result<Vec<OrderEvent>, OrderError> {
        self.editable()?;
        if c.quantity == 0 || c.price_cents <= 0 {
            return Err(OrderError::InvalidItem(format!(
                "quantity {} at {} cents",
                c.quantity, c.price_cents
            )));
        }
        Ok(vec![ItemAdded {
            sku: c.sku.clone(),
            quantity: c.quantity,
            unit_price: Money {
                cents: c.price_cents,
                currency: "EUR".to_owned(),
            },
        }
        .into()])
    }
}

impl Handle<SubmitOrder> for Order {
    type Error = OrderError;
    fn handle(&self, _: &SubmitOrder) -> Result<Vec<OrderEvent>, OrderError> {
        self.editable()?;
        if self.items.is_empty() {
            return Err(OrderError::EmptyOrder);
        }
        Ok(vec![OrderSubmitted {
            total_cents: self.total(),
        }
        .into()])
    }
}

impl Order {
    fn editable(&self) -> Result<(), OrderError> {
        match (self.created, self.submitted) {
            (false, _) => Err(OrderError::NotFound),
            (true, true) => Err(OrderError::OrderNotEditable),
            (true, false) => Ok(()),
        }
    }
}

macro_rules! routed_by_order {
    ($($command:ty),*) => {$(
        impl Command for $command {
            type Aggregate = Order;
        }
    )*};
}
routed_by_order!(CreateOrder, AddItem, SubmitOrder);

/// One order as the lookup-by-id read model shows it.
#[derive(Debug, Default, Clone, PartialEq, Serialize)]
pub struct OrderView {
    /// Order id.
    pub id: String,
    /// Customer id.
    pub customer: String,
    /// Lines: sku to quantity.
    pub lines: BTreeMap<String, u32>,
    /// Running total in cents.
    pub total_cents: i64,
    /// "open" or "submitted".
    pub status: String,
}

/// Read model 1: order lookup by id.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct OrderLookup {
    /// Orders by id.
    pub orders: BTreeMap<String, OrderView>,
}

#[projection(name = "order_lookup")]
impl OrderLookup {
    fn on_created(&mut self, e: &OrderCreated, meta: &RecordedEvent) {
        let id = meta.stream.id().to_owned();
        self.orders.insert(
            id.clone(),
            OrderView {
                id,
                customer: e.customer.clone(),
                status: "open".to_owned(),
                ..OrderView::default()
            },
        );
    }

    fn on_item(&mut self, e: &ItemAdded, meta: &RecordedEvent) {
        if let Some(view) = self.orders.get_mut(meta.stream.id()) {
            *view.lines.entry(e.sku.clone()).or_default() += e.quantity;
            view.total_cents += i64::from(e.quantity) * e.unit_price.cents;
        }
    }

    fn on_submitted(&mut self, _: &OrderSubmitted, meta: &RecordedEvent) {
        if let Some(view) = self.orders.get_mut(meta.stream.id()) {
            "submitted".clone_into(&mut view.status);
        }
    }
}

/// Read model 2: find orders by (part of) the customer's name.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CustomerSearch {
    /// Lower-cased name words to order ids.
    pub index: BTreeMap<String, BTreeSet<String>>,
}

#[projection(name = "customer_search")]
impl CustomerSearch {
    fn on_created(&mut self, e: &OrderCreated, meta: &RecordedEvent) {
        for word in e.customer_name.split_whitespace() {
            self.index
                .entry(word.to_lowercase())
                .or_default()
                .insert(meta.stream.id().to_owned());
        }
    }

    /// Orders whose customer name contains a word starting with `prefix`.
    #[helper]
    pub fn search(&self, prefix: &str) -> BTreeSet<String> {
        let prefix = prefix.to_lowercase();
        self.index
            .range(prefix.clone()..)
            .take_while(|(word, _)| word.starts_with(&prefix))
            .flat_map(|(_, ids)| ids.iter().cloned())
            .collect()
    }
}

/// Read model 3: revenue per day of submission.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DailyRevenue {
    /// Revenue in cents and number of orders per day.
    pub days: BTreeMap<NaiveDate, (i64, u32)>,
}

#[projection(name = "daily_revenue")]
impl DailyRevenue {
    fn on_submitted(&mut self, e: &OrderSubmitted, meta: &RecordedEvent) {
        let day = self.days.entry(meta.recorded_at.date_naive()).or_default();
        day.0 += e.total_cents;
        day.1 += 1;
    }
}

/// What the orders demo did, for printing and for tests.
#[derive(Debug, Clone, PartialEq)]
pub struct OrdersReport {
    /// Lookup of the first order.
    pub first_order: OrderView,
    /// Orders found searching "gra".
    pub search_hits: BTreeSet<String>,
    /// Revenue and order count of today.
    pub revenue_today: (i64, u32),
    /// The error for editing a submitted order.
    pub not_editable: OrderError,
    /// The error for submitting an empty order.
    pub empty: OrderError,
    /// The price of the item the old release stored as V1, as the current code reads it.
    pub upcast_price: (i64, String),
}

/// Runs the orders story on `store` with order ids prefixed by `run`, printing to `out`.
pub async fn demo<S>(
    store: S,
    run: &str,
    out: &mut impl std::io::Write,
) -> Result<OrdersReport, Box<dyn std::error::Error + Send + Sync>>
where
    S: EventStore + Clone,
{
    use std::sync::Arc;
    use std::time::Duration;

    use cqrs_core::subscription::{InProcess, ProjectionRunner};
    use cqrs_core::{ExecuteError, ExpectedVersion, NewEvent};

    let orders = Repository::<Order>::new(store.clone());
    let backend = Arc::new(InProcess::new(store.clone()));
    let lookup = ProjectionRunner::shared(OrderLookup::default(), backend.clone()).spawn();
    let search = ProjectionRunner::shared(CustomerSearch::default(), backend.clone()).spawn();
    let revenue = ProjectionRunner::shared(DailyRevenue::default(), backend).spawn();

    let (first, second) = (format!("{run}-o1"), format!("{run}-o2"));
    let create = |order: &str, name: &str| CreateOrder {
        order: order.to_owned(),
        customer: format!("cust-{name}"),
        customer_name: name.to_owned(),
    };
    orders
        .execute(&first, &create(&first, "Grace Hopper"))
        .await?;
    for (sku, quantity, price_cents) in [("keyboard", 1, 4_500), ("cable", 3, 700)] {
        let add = AddItem {
            order: first.clone(),
            sku: sku.to_owned(),
            quantity,
            price_cents,
        };
        orders.execute(&first, &add).await?;
    }
    orders
        .execute(
            &first,
            &SubmitOrder {
                order: first.clone(),
            },
        )
        .await?;
    writeln!(out, "order {first} submitted")?;
    let late = AddItem {
        order: first.clone(),
        sku: "mouse".to_owned(),
        quantity: 1,
        price_cents: 1_000,
    };
    let not_editable = match orders.execute(&first, &late).await {
        Err(ExecuteError::Domain(e)) => e,
        other => return Err(format!("expected OrderNotEditable, got {other:?}").into()),
    };
    writeln!(out, "adding to {first} after submit: {not_editable}")?;

    orders
        .execute(&second, &create(&second, "Alan Turing"))
        .await?;
    let empty = match orders
        .execute(
            &second,
            &SubmitOrder {
                order: second.clone(),
            },
        )
        .await
    {
        Err(ExecuteError::Domain(e)) => e,
        other => return Err(format!("expected EmptyOrder, got {other:?}").into()),
    };
    writeln!(out, "submitting empty {second}: {empty}")?;

    // An old release stored ItemAdded at schema version 1; the current code reads it as version 2.
    let legacy = NewEvent::from_event(&ItemAddedV1 {
        sku: "manual".to_owned(),
        quantity: 1,
        price: 999,
    })?;
    store
        .append(
            &StreamId::new(Order::TYPE, second.as_str()),
            ExpectedVersion::Exact(StreamVersion::new(1)),
            vec![legacy],
        )
        .await?;
    let loaded = orders.load(&second).await?;
    writeln!(
        out,
        "{second} after the old release's V1 event: {:?}",
        loaded.state.items
    )?;
    let submitted = orders
        .execute(
            &second,
            &SubmitOrder {
                order: second.clone(),
            },
        )
        .await?;
    let legacy_event = store
        .read_stream(
            &StreamId::new(Order::TYPE, second.as_str()),
            StreamVersion::new(2),
            1,
        )
        .await?;
    let upcast: ItemAdded = legacy_event
        .first()
        .ok_or("legacy event missing")?
        .decode()?;

    let last = submitted.position.ok_or("submit wrote no event")?;
    let timeout = Duration::from_secs(10);
    lookup.wait_for(last, timeout).await?;
    search.wait_for(last, timeout).await?;
    revenue.wait_for(last, timeout).await?;
    let lookup = lookup.stop().await.ok_or("lookup stopped")?;
    let search = search.stop().await.ok_or("search stopped")?;
    let revenue = revenue.stop().await.ok_or("revenue stopped")?;
    let first_order = lookup
        .orders
        .get(&first)
        .cloned()
        .ok_or("first order not projected")?;
    let search_hits = search.search("gra");
    let today = chrono::Utc::now().date_naive();
    let revenue_today = revenue.days.get(&today).copied().unwrap_or_default();
    writeln!(out, "lookup {first}: {first_order:?}")?;
    writeln!(
        out,
        "search 'gra': {search_hits:?}; revenue today: {revenue_today:?}"
    )?;
    Ok(OrdersReport {
        first_order,
        search_hits,
        revenue_today,
        not_editable,
        empty,
        upcast_price: (upcast.unit_price.cents, upcast.unit_price.currency),
    })
}
