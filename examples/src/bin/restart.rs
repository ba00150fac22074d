//! `DATABASE_URL=postgres://… cargo run -p examples --bin restart`: a read model in PostgreSQL
//! whose runner dies part-way through and is restarted; every event is applied exactly once.
//! Needs PostgreSQL (it shows `PostgresProjections`); it uses the schema `cqrs_examples`.

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let Some(store) = examples::postgres_from_env().await? else {
        return Err(
            "this example shows the PostgreSQL projection backend: set DATABASE_URL=postgres://…"
                .into(),
        );
    };
    let report = examples::restart::demo(store, 2_000, &mut std::io::stdout()).await?;
    if report.applied != report.appended || report.total != report.expected_total {
        return Err(format!("the read model does not match the log: {report:?}").into());
    }
    Ok(())
}
