//! `cargo run -p examples --bin bank`: the bank account story, in memory (or on PostgreSQL when
//! `DATABASE_URL` is set).

use cqrs_core::InMemoryStore;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let account = format!("acc-{}", uuid_suffix());
    let mut out = std::io::stdout();
    let report = examples::bank::demo(InMemoryStore::new(), &account, &mut out).await?;
    println!("final balance of {}: {}", report.account, report.balance);
    Ok(())
}

fn uuid_suffix() -> String {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros().to_string())
        .unwrap_or_default()
}
