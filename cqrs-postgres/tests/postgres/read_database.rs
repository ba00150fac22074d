//! The projection conformance suite for a PostgreSQL read database fed from an event store in
//! another database: `PostgresProjections::with_event_source`.

use std::sync::Arc;

use cqrs_postgres::PostgresProjections;
use sqlx::postgres::PgConnection;

use crate::{fresh_read_store, fresh_store};

/// An event store in the test database and a read database elsewhere, each on its own pool.
async fn read_database_backend() -> PostgresProjections {
    let events = fresh_store().await;
    let projections =
        PostgresProjections::with_event_source(Arc::new(events), fresh_read_store(4).await);
    projections.migrate().await.unwrap();
    projections
}

cqrs_core::projection_conformance_tests!(read_database_backend, context = PgConnection);
