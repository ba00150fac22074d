//! `cargo run -p examples --bin catalogue`: the catalogue story, on an SQLite file (see
//! `examples::open_store`; `-- --memory` runs in memory, `DATABASE_URL=postgres://…` on PostgreSQL).

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let run = examples::run_id();
    let mut out = std::io::stdout();
    let report = match examples::open_store("catalogue", &mut out).await? {
        examples::Store::Sqlite(store) => examples::catalogue::demo(store, &run, &mut out).await?,
        examples::Store::Postgres(store) => {
            examples::catalogue::demo(store, &run, &mut out).await?
        }
        examples::Store::Memory(store) => examples::catalogue::demo(store, &run, &mut out).await?,
    };
    println!("{report:#?}");
    Ok(())
}
