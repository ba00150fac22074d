//! Product catalogue: prices must be positive; a process manager discontinues a product when its
//! stock runs out, and the stored metadata shows why (causation) and in which conversation
//! (correlation).

use cqrs_core::backend::ProjectionBackend;
use cqrs_core::prelude::*;
use cqrs_core::{event, projection, ExecuteError, Projection};
use serde::{Deserialize, Serialize};

/// A product was added to the catalogue.
#[event(name = "ProductCreated")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductCreated {
    /// Display name.
    pub name: String,
    /// Price in cents.
    pub price_cents: i64,
    /// Units in stock.
    pub stock: u32,
}

/// The price changed.
#[event(name = "PriceChanged")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PriceChanged {
    /// New price in cents.
    pub price_cents: i64,
}

/// Units were sold.
#[event(name = "ProductSold")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductSold {
    /// Units sold.
    pub quantity: u32,
}

/// The last unit was sold.
#[event(name = "StockDepleted")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockDepleted {}

/// The product is no longer sold.
#[event(name = "ProductDiscontinued")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProductDiscontinued {
    /// Why.
    pub reason: String,
}

/// A product.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, Aggregate)]
#[aggregate(
    name = "product",
    events(
        ProductCreated,
        PriceChanged,
        ProductSold,
        StockDepleted,
        ProductDiscontinued
    )
)]
pub struct Product {
    /// Whether it exists.
    pub created: bool,
    /// Price in cents.
    pub price_cents: i64,
    /// Units in stock.
    pub stock: u32,
    /// Whether it was discontinued.
    pub discontinued: bool,
}

impl Apply<ProductCreated> for Product {
    fn apply(&mut self, e: &ProductCreated) {
        self.created = true;
        self.price_cents = e.price_cents;
        self.stock = e.stock;
    }
}

impl Apply<PriceChanged> for Product {
    fn apply(&mut self, e: &PriceChanged) {
        self.price_cents = e.price_cents;
    }
}

impl Apply<ProductSold> for Product {
    fn apply(&mut self, e: &ProductSold) {
        self.stock -= e.quantity;
    }
}

impl Apply<StockDepleted> for Product {
    fn apply(&mut self, _: &StockDepleted) {}
}

impl Apply<ProductDiscontinued> for Product {
    fn apply(&mut self, _: &ProductDiscontinued) {
        self.discontinued = true;
    }
}

/// Why a catalogue command is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogueError {
    /// Prices must be positive.
    #[error("price must be positive, got {0} cents")]
    NonPositivePrice(i64),
    /// Creating a product twice.
    #[error("product already exists")]
    AlreadyExists,
    /// The product does not exist.
    #[error("product does not exist")]
    NotFound,
    /// The product is discontinued.
    #[error("product is discontinued")]
    Discontinued,
    /// Selling more than is in stock.
    #[error("only {available} in stock, {requested} requested")]
    OutOfStock {
        /// Units in stock.
        available: u32,
        /// Units requested.
        requested: u32,
    },
}

/// Add a product.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateProduct {
    /// Product id.
    pub product: String,
    /// Display name.
    pub name: String,
    /// Price in cents.
    pub price_cents: i64,
    /// Initial stock.
    pub stock: u32,
}

/// Change the price.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChangePrice {
    /// Product id.
    pub product: String,
    /// New price in cents.
    pub price_cents: i64,
}

/// Sell units.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sell {
    /// Product id.
    pub product: String,
    /// Units.
    pub quantity: u32,
}

/// Stop selling the product.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Discontinue {
    /// Product id.
    pub product: String,
    /// Why.
    pub reason: String,
}

impl Product {
    fn existing(&self) -> Result<(), CatalogueError> {
        match (self.created, self.discontinued) {
            (false, _) => Err(CatalogueError::NotFound),
            (true, true) => Err(CatalogueError::Discontinued),
            (true, false) => Ok(()),
        }
    }
}

fn positive(price_cents: i64) -> Result<(), CatalogueError> {
    if price_cents > 0 {
        Ok(())
    } else {
        Err(CatalogueError::NonPositivePrice(price_cents))
    }
}

impl Handle<CreateProduct> for Product {
    type Error = CatalogueError;
    fn handle(&self, c: &CreateProduct) -> Result<Vec<ProductEvent>, CatalogueError> {
        if self.created {
            return Err(CatalogueError::AlreadyExists);
        }
        positive(c.price_cents)?;
        Ok(vec![ProductCreated {
            name: c.name.clone(),
            price_cents: c.price_cents,
            stock: c.stock,
        }
        .into()])
    }
}

impl Handle<ChangePrice> for Product {
    type Error = CatalogueError;
    fn handle(&self, c: &ChangePrice) -> Result<Vec<ProductEvent>, CatalogueError> {
        self.existing()?;
        positive(c.price_cents)?;
        Ok(vec![PriceChanged {
            price_cents: c.price_cents,
        }
        .into()])
    }
}

impl Handle<Sell> for Product {
    type Error = CatalogueError;
    fn handle(&self, c: &Sell) -> Result<Vec<ProductEvent>, CatalogueError> {
        self.existing()?;
        if c.quantity > self.stock {
            return Err(CatalogueError::OutOfStock {
                available: self.stock,
                requested: c.quantity,
            });
        }
        let mut events = vec![ProductSold {
            quantity: c.quantity,
        }
        .into()];
        if c.quantity == self.stock {
            events.push(StockDepleted {}.into());
        }
        Ok(events)
    }
}

impl Handle<Discontinue> for Product {
    type Error = CatalogueError;
    fn handle(&self, c: &Discontinue) -> Result<Vec<ProductEvent>, CatalogueError> {
        self.existing()?;
        Ok(vec![ProductDiscontinued {
            reason: c.reason.clone(),
        }
        .into()])
    }
}

/// The process manager: reacts to `StockDepleted` by issuing `Discontinue`, in the same
/// conversation and caused by that event. Runs as a projection, so it is checkpointed like one;
/// its effect (a command) is outside the checkpoint's transaction, so delivery is at-least-once and
/// the reaction is idempotent (its command id is derived from the event, and discontinuing twice is
/// answered by the aggregate and ignored here).
///
/// `C` is the context of the projection backend it runs on: `()` for the volatile
/// [`InProcess`](cqrs_core::subscription::InProcess), the backend's connection for a durable one
/// (e.g. `sqlx::SqliteConnection` for `SqliteProjections`), whose checkpoint survives restarts.
/// The handler does not use the connection: only the checkpoint lives there.
pub struct DiscontinueWhenSoldOut<C = ()> {
    /// Where the reaction's command goes.
    pub products: Repository<Product>,
    context: std::marker::PhantomData<fn() -> C>,
}

impl<C> std::fmt::Debug for DiscontinueWhenSoldOut<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscontinueWhenSoldOut")
            .field("products", &self.products)
            .finish_non_exhaustive()
    }
}

impl<C> DiscontinueWhenSoldOut<C> {
    /// The process manager sending its commands to `products`.
    pub fn new(products: Repository<Product>) -> Self {
        Self {
            products,
            context: std::marker::PhantomData,
        }
    }
}

#[projection(name = "discontinue_when_sold_out", context = C)]
impl<C: Send + 'static> DiscontinueWhenSoldOut<C> {
    async fn on_depleted(
        &mut self,
        _: &StockDepleted,
        meta: &RecordedEvent,
    ) -> Result<(), cqrs_core::HandlerError> {
        let command = Discontinue {
            product: meta.stream.id().to_owned(),
            reason: "sold out".to_owned(),
        };
        let context = CommandContext::caused_by(meta, "discontinue_when_sold_out")?;
        match self
            .products
            .execute_in(&command.product, &command, &context)
            .await
        {
            Ok(_) | Err(ExecuteError::Domain(CatalogueError::Discontinued)) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }
}

/// The durable backend for the process manager of a catalogue on SQLite file `store`: it reads
/// the log from `store`, and keeps its checkpoint in a file of its own beside it
/// (`<file>.process-manager.db`). A batch on `SqliteProjections` holds its file's write lock
/// while the handlers run, and this handler appends to the log (its command): with the
/// checkpoint in the log's file, the append would wait for the batch that waits for it.
pub async fn sqlite_manager_backend(
    store: &cqrs_sqlite::SqliteStore,
) -> Result<cqrs_sqlite::SqliteProjections, cqrs_core::StoreError> {
    let checkpoints =
        cqrs_sqlite::SqliteStore::open(store.path().with_extension("process-manager.db")).await?;
    Ok(cqrs_sqlite::SqliteProjections::with_event_source(
        std::sync::Arc::new(store.clone()),
        checkpoints,
    ))
}

/// What the catalogue demo did, for printing and for tests.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogueReport {
    /// The error for a non-positive price.
    pub bad_price: CatalogueError,
    /// Whether the process manager discontinued the product.
    pub discontinued: bool,
    /// The `StockDepleted` event's id and its correlation id.
    pub depleted: (uuid::Uuid, Option<uuid::Uuid>),
    /// The `ProductDiscontinued` event's causation and correlation ids.
    pub discontinued_metadata: (Option<uuid::Uuid>, Option<uuid::Uuid>),
    /// The process manager's checkpoint when it started: `None` on a fresh log or a volatile
    /// backend, else where an earlier run left it.
    pub manager_resumed_from: Option<Position>,
}

/// Runs the catalogue story on `store` for product `product`, printing to `out`, with the
/// process manager on the volatile [`InProcess`](cqrs_core::subscription::InProcess) backend.
pub async fn demo<S>(
    store: S,
    product: &str,
    out: &mut impl std::io::Write,
) -> Result<CatalogueReport, Box<dyn std::error::Error + Send + Sync>>
where
    S: EventStore + Clone,
{
    let manager = cqrs_core::subscription::InProcess::new(store.clone());
    demo_on(store, manager, product, out).await
}

/// Runs the catalogue story on `store` for product `product`, printing to `out`, with the
/// process manager on projection backend `manager` (e.g. `SqliteProjections` for the store's
/// SQLite file): on a durable backend it continues after its checkpoint from earlier runs.
pub async fn demo_on<S, B, C>(
    store: S,
    manager: B,
    product: &str,
    out: &mut impl std::io::Write,
) -> Result<CatalogueReport, Box<dyn std::error::Error + Send + Sync>>
where
    S: EventStore + Clone,
    B: ProjectionBackend<DiscontinueWhenSoldOut<C>>,
    C: Send + 'static,
{
    use std::time::Duration;

    use cqrs_core::subscription::ProjectionRunner;

    let products = Repository::<Product>::new(store.clone());
    let name = <DiscontinueWhenSoldOut<C> as Projection>::NAME;
    let manager_resumed_from = manager.load_checkpoint(name).await?;
    match manager_resumed_from {
        None => writeln!(
            out,
            "process manager {name}: no checkpoint, reads the log from its start"
        )?,
        Some(checkpoint) => writeln!(
            out,
            "process manager {name}: continues after its checkpoint {checkpoint} from earlier \
             runs (their events are not reacted to again)"
        )?,
    }
    let manager =
        ProjectionRunner::new(DiscontinueWhenSoldOut::new(products.clone()), manager).spawn();

    let create = CreateProduct {
        product: product.to_owned(),
        name: "Rust mug".to_owned(),
        price_cents: 1_200,
        stock: 3,
    };
    products.execute(product, &create).await?;
    let bad_price = match products
        .execute(
            product,
            &ChangePrice {
                product: product.to_owned(),
                price_cents: -5,
            },
        )
        .await
    {
        Err(ExecuteError::Domain(e)) => e,
        other => return Err(format!("expected NonPositivePrice, got {other:?}").into()),
    };
    writeln!(out, "price -5 rejected: {bad_price}")?;
    products
        .execute(
            product,
            &ChangePrice {
                product: product.to_owned(),
                price_cents: 990,
            },
        )
        .await?;
    products
        .execute(
            product,
            &Sell {
                product: product.to_owned(),
                quantity: 2,
            },
        )
        .await?;
    let sold_out = products
        .execute(
            product,
            &Sell {
                product: product.to_owned(),
                quantity: 1,
            },
        )
        .await?;
    writeln!(
        out,
        "sold the last unit (version {})",
        sold_out.stream_version
    )?;

    manager
        .wait_for(
            sold_out.position.ok_or("no event")?,
            Duration::from_secs(10),
        )
        .await?;
    let _ = manager.stop().await;
    let stream = StreamId::new(Product::TYPE, product);
    let events = store
        .read_stream(&stream, StreamVersion::new(1), 100)
        .await?;
    let depleted = events
        .iter()
        .find(|e| e.event_type == StockDepleted::NAME)
        .ok_or("no StockDepleted")?;
    let discontinued = events
        .iter()
        .find(|e| e.event_type == ProductDiscontinued::NAME);
    for e in &events {
        let metadata = e.metadata()?;
        writeln!(
            out,
            "  v{} {:<20} causation={:?} correlation={:?}",
            e.stream_version, e.event_type, metadata.causation_id, metadata.correlation_id
        )?;
    }
    Ok(CatalogueReport {
        bad_price,
        discontinued: products.load(product).await?.state.discontinued,
        depleted: (
            *depleted.event_id.as_uuid(),
            depleted.metadata()?.correlation_id,
        ),
        discontinued_metadata: discontinued
            .map(|e| e.metadata().map(|m| (m.causation_id, m.correlation_id)))
            .transpose()?
            .unwrap_or_default(),
        manager_resumed_from,
    })
}
