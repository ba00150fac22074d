//! `cargo run -p examples --bin orders`: the orders story, on an SQLite file (see
//! `examples::open_store`; `-- --memory` runs in memory, `DATABASE_URL=postgres://…` on PostgreSQL).

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let run = examples::run_id();
    let mut out = std::io::stdout();
    let report = match examples::open_store("orders", &mut out).await? {
        examples::Store::Sqlite(store) => examples::orders::demo(store, &run, &mut out).await?,
        examples::Store::Postgres(store) => examples::orders::demo(store, &run, &mut out).await?,
        examples::Store::Memory(store) => examples::orders::demo(store, &run, &mut out).await?,
    };
    println!("{report:#?}");
    Ok(())
}
