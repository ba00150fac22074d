//! `cargo run -p examples --bin bank`: the bank account story, in memory (or on PostgreSQL when
//! `DATABASE_URL` is set).

use cqrs_core::InMemoryStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let account = format!("acc-{}", examples::run_id());
    let mut out = std::io::stdout();
    let report = match examples::postgres_from_env().await? {
        Some(store) => examples::bank::demo(store, &account, &mut out).await?,
        None => examples::bank::demo(InMemoryStore::new(), &account, &mut out).await?,
    };
    println!("final balance of {}: {}", report.account, report.balance);
    Ok(())
}
