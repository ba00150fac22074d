//! `cargo run -p examples --bin orders`: the orders story, in memory (or on PostgreSQL when
//! `DATABASE_URL` is set).

use cqrs_core::InMemoryStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let run = examples::run_id();
    let mut out = std::io::stdout();
    let report = match examples::postgres_from_env().await? {
        Some(store) => examples::orders::demo(store, &run, &mut out).await?,
        None => examples::orders::demo(InMemoryStore::new(), &run, &mut out).await?,
    };
    println!("{report:#?}");
    Ok(())
}
