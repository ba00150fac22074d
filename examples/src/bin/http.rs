//! `cargo run -p examples --bin http`: the bank as an HTTP service on 127.0.0.1:3000
//! (override with `BIND`), on an SQLite file (see `examples::open_store`; `-- --memory` runs in
//! memory, `DATABASE_URL=postgres://…` on PostgreSQL).
//!
//! ```text
//! curl -si -XPOST localhost:3000/accounts -H 'content-type: application/json' -d '{"id":"a1","owner":"Ada"}'
//! curl -si -XPOST localhost:3000/accounts/a1/deposits -H 'content-type: application/json' -d '{"amount":500}'
//! curl -si localhost:3000/accounts/a1/balance -H 'x-consistency-token: <token from the POST>'
//! curl -s localhost:3000/metrics
//! ```
//!
//! With `OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4318` (an OpenTelemetry collector's
//! OTLP/HTTP port) the command and projection batch spans are exported there
//! (`examples::telemetry`); without it nothing is sent.

use std::time::Duration;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let bind = std::env::var("BIND").unwrap_or_else(|_| "127.0.0.1:3000".to_owned());
    let wait = Duration::from_secs(2);
    // Before the app starts its runner, which registers its metrics when it starts.
    let metrics = examples::http::install_metrics()?;
    // Off unless OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) names a collector.
    let telemetry = examples::telemetry::init_from_env()?;
    let app = match examples::open_store("http", &mut std::io::stdout()).await? {
        examples::Store::Sqlite(store) => examples::http::app(store, wait)?,
        examples::Store::Postgres(store) => examples::http::app(store, wait)?,
        examples::Store::Memory(store) => examples::http::app(store, wait)?,
    };
    let app = app.merge(examples::http::metrics_router(metrics));
    let listener = tokio::net::TcpListener::bind(&bind).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    if let Some(provider) = telemetry {
        // Sends the spans still buffered; a blocking call, off the runtime's threads.
        tokio::task::spawn_blocking(move || provider.shutdown()).await??;
    }
    Ok(())
}
