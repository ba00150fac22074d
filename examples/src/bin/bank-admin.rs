//! `cargo run -p examples --bin bank-admin -- <command>`: the `cqrs-admin` command line with the
//! bank's aggregate and read model registered, so that besides inspecting streams it shows an
//! account's state (`show account <id> --state --at-version 3`) and rebuilds, resets or skips
//! for the `bank_balances` table of the SQLite file (`--url sqlite:<file>`, or `DATABASE_URL`).
//! On PostgreSQL the bank keeps its balances in memory, so only the inspecting commands apply.

use cqrs_admin::{Admin, Connection, ProjectionSetup};
use cqrs_core::StoreError;
use examples::bank::{Account, SqlBalances};

fn main() -> std::process::ExitCode {
    Admin::new()
        .aggregate::<Account>()
        .projection(|connection| match connection {
            Connection::Sqlite(store) => {
                let projections = cqrs_sqlite::SqliteProjections::new(store.clone());
                let store = store.clone();
                Some(
                    ProjectionSetup::new(projections, || SqlBalances).with_reset(move || {
                        let store = store.clone();
                        async move { SqlBalances::clear(&store).await.map_err(backend) }
                    }),
                )
            }
            _ => None,
        })
        .run(std::env::args_os())
}

fn backend(error: sqlx::Error) -> StoreError {
    StoreError::Backend(Box::new(error))
}
