//! `cargo run -p examples --bin orders`: the orders story, on an SQLite file (see
//! `examples::open_store`; `-- --memory` runs in memory, `DATABASE_URL=postgres://…` on PostgreSQL).
//! On PostgreSQL it then feeds read models in their own stores for different consumers
//! (`examples::orders_read_models`): an order lookup and a full-text search in a read database
//! (`READ_DATABASE_URL`, default: schema `cqrs_examples_read` of the same database, standing in
//! for one) and a customer dashboard in Redis (`REDIS_URL`, default `redis://127.0.0.1:6379/`).

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let run = examples::run_id();
    let mut out = std::io::stdout();
    let report = match examples::open_store("orders", &mut out).await? {
        examples::Store::Sqlite(store) => examples::orders::demo(store, &run, &mut out).await?,
        examples::Store::Postgres(store) => {
            let report = examples::orders::demo(store.clone(), &run, &mut out).await?;
            let read_url = std::env::var("READ_DATABASE_URL")
                .or_else(|_| std::env::var("DATABASE_URL"))
                .unwrap_or_default();
            let read = cqrs_postgres::PostgresStore::connect(&read_url)
                .await?
                .with_schema("cqrs_examples_read")?;
            let redis =
                std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".to_owned());
            let read_models = examples::orders_read_models::demo(
                store,
                read,
                &redis,
                "cqrs-examples:orders:",
                &run,
                &mut out,
            )
            .await?;
            println!("{read_models:#?}");
            report
        }
        examples::Store::Memory(store) => examples::orders::demo(store, &run, &mut out).await?,
    };
    println!("{report:#?}");
    Ok(())
}
