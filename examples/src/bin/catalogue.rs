//! `cargo run -p examples --bin catalogue`: the catalogue story, on an SQLite file (see
//! `examples::open_store`; `-- --memory` runs in memory, `DATABASE_URL=postgres://…` on PostgreSQL).
//! The process manager runs on a durable projection backend (on SQLite, a file beside the log's:
//! see `catalogue::sqlite_manager_backend`), so its checkpoint survives
//! restarts: run it twice and the second run continues after the first one's reactions. With
//! `--memory` it runs on the volatile `InProcess` backend.

use examples::catalogue;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let run = examples::run_id();
    let mut out = std::io::stdout();
    let report = match examples::open_store("catalogue", &mut out).await? {
        examples::Store::Sqlite(store) => {
            let manager = catalogue::sqlite_manager_backend(&store).await?;
            catalogue::demo_on(store, manager, &run, &mut out).await?
        }
        examples::Store::Postgres(store) => {
            let manager = cqrs_postgres::PostgresProjections::new(store.clone());
            catalogue::demo_on(store, manager, &run, &mut out).await?
        }
        examples::Store::Memory(store) => catalogue::demo(store, &run, &mut out).await?,
    };
    println!("{report:#?}");
    Ok(())
}
