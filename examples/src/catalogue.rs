//! Product catalogue: prices must be positive; a process manager discontinues a product when its
//! stock runs out, and the stored metadata shows why (causation) and in which conversation
//! (correlation).

use cqrs_core::prelude::*;
use cqrs_core::{event, projection, ExecuteError};
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
/// the reaction is idempotent (discontinuing twice is answered by the aggregate and ignored here).
#[derive(Debug)]
pub struct DiscontinueWhenSoldOut {
    /// Where the reaction's command goes.
    pub products: Repository<Product>,
}

#[projection(name = "discontinue_when_sold_out")]
impl DiscontinueWhenSoldOut {
    async fn on_depleted(
        &mut self,
        _: &StockDepleted,
        meta: &RecordedEvent,
    ) -> Result<(), ExecuteError<CatalogueError>> {
        let command = Discontinue {
            product: meta.stream.id().to_owned(),
            reason: "sold out".to_owned(),
        };
        let context = CommandContext::caused_by(meta, "discontinue_when_sold_out");
        match self
            .products
            .execute_in(&command.product, &command, &context)
            .await
        {
            Ok(_) | Err(ExecuteError::Domain(CatalogueError::Discontinued)) => Ok(()),
            Err(error) => Err(error),
        }
    }
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
}

/// Runs the catalogue story on `store` for product `product`, printing to `out`.
pub async fn demo<S>(
    store: S,
    product: &str,
    out: &mut impl std::io::Write,
) -> Result<CatalogueReport, Box<dyn std::error::Error + Send + Sync>>
where
    S: EventStore + Clone,
{
    use std::time::Duration;

    use cqrs_core::subscription::{InProcess, ProjectionRunner};

    let products = Repository::<Product>::new(store.clone());
    let manager = DiscontinueWhenSoldOut {
        products: products.clone(),
    };
    let manager = ProjectionRunner::new(manager, InProcess::new(store.clone())).spawn();

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
        writeln!(
            out,
            "  v{} {:<20} causation={:?} correlation={:?}",
            e.stream_version, e.event_type, e.metadata.causation_id, e.metadata.correlation_id
        )?;
    }
    Ok(CatalogueReport {
        bad_price,
        discontinued: products.load(product).await?.state.discontinued,
        depleted: (
            *depleted.event_id.as_uuid(),
            depleted.metadata.correlation_id,
        ),
        discontinued_metadata: discontinued
            .map(|e| (e.metadata.causation_id, e.metadata.correlation_id))
            .unwrap_or_default(),
    })
}
