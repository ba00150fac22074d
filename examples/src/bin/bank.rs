//! `cargo run -p examples --bin bank`: the bank account story, on an SQLite file with its balances
//! read model in a table of the same file (see `examples::open_store`; `-- --memory` runs in
//! memory, `DATABASE_URL=postgres://…` on PostgreSQL). Run it twice: the second run continues the
//! first one's log and read model.

use examples::bank::{self, ReadModel};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let account = format!("acc-{}", examples::run_id());
    let mut out = std::io::stdout();
    let report = match examples::open_store("bank", &mut out).await? {
        examples::Store::Sqlite(store) => {
            let read_model = ReadModel::Sqlite(store.clone());
            bank::demo_with(store, read_model, &account, &mut out).await?
        }
        examples::Store::Postgres(store) => bank::demo(store, &account, &mut out).await?,
        examples::Store::Memory(store) => bank::demo(store, &account, &mut out).await?,
    };
    println!("final balance of {}: {}", report.account, report.balance);
    Ok(())
}
