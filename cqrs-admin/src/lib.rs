//! An operator's command line for cqrs event stores, as a library to embed and a ready binary.
//!
//! The ready binary `cqrs-admin` does everything that needs no code of yours: list stream types
//! and streams, show a stream's events, follow the log live, the projections' status, the
//! horizon report, migrations. Rebuilding, resetting and skipping need your projections, and a
//! stream's state needs your aggregate: register them with [`Admin`] in a binary of your own.
//!
//! ```no_run
//! use cqrs_admin::{Admin, Connection, ProjectionSetup};
//! # use cqrs_core::prelude::*;
//! # #[event(name = "Opened")] #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)] pub struct Opened;
//! # #[derive(Debug, Default, serde::Serialize, serde::Deserialize, Aggregate)]
//! # #[aggregate(name = "account", events(Opened))] pub struct Account;
//! # impl Apply<Opened> for Account { fn apply(&mut self, _: &Opened) {} }
//! # #[derive(Default)] pub struct Accounts;
//! # #[projection(name = "accounts")]
//! # impl Accounts {
//! #     async fn on(&mut self, _: &Opened, db: &mut sqlx::SqliteConnection) -> Result<(), sqlx::Error> {
//! #         sqlx::query("INSERT INTO accounts DEFAULT VALUES").execute(db).await.map(drop)
//! #     }
//! # }
//!
//! fn main() -> std::process::ExitCode {
//!     Admin::new()
//!         .aggregate::<Account>()
//!         .projection(|connection| match connection {
//!             Connection::Sqlite(store) => Some(ProjectionSetup::new(
//!                 cqrs_sqlite::SqliteProjections::new(store.clone()),
//!                 Accounts::default,
//!             )),
//!             _ => None,
//!         })
//!         .run(std::env::args_os())
//! }
//! ```
//!
//! # The database
//!
//! `--url` (or `DATABASE_URL`) decides the backend: `postgres://…` or `postgresql://…` is
//! PostgreSQL (in the schema of `--schema`, default `public`); `sqlite:path`, `sqlite://path` or a
//! plain path is an SQLite file. Any other scheme is refused with exit code 4. Only `migrate`
//! creates an SQLite file; every other command refuses a path where no file is.
//!
//! # Exit codes
//!
//! | code | meaning |
//! | --- | --- |
//! | 0 | done |
//! | 1 | the store or a projection failed (the message says which, and what to do) |
//! | 2 | the command line is wrong |
//! | 3 | not found: a projection or aggregate not registered, a stream without events |
//! | 4 | the database cannot be reached: unsupported URL, no such file, connection refused |
//! | 5 | the schema has no event store tables: run `migrate` |
//! | 6 | refused: a runner holds the projection, or a skip names another event than the next |
//! | 130 | interrupted by Ctrl-C (what was committed stays) |
//!
//! With `--json` every command prints JSON (one document, or one line per event for `follow`)
//! instead of tables.

mod cli;
mod commands;
mod connect;
mod error;
mod output;
mod registry;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;
pub use cqrs_core::subscription::Progress;
use cqrs_core::Projection;

pub use connect::{connect, Connection};
pub use error::{AdminError, Exit};
pub use registry::ProjectionSetup;
use registry::{RegisteredAggregate, RegisteredProjection};

/// The command line, with the projections and aggregates registered on it.
#[derive(Default)]
pub struct Admin {
    projections: Vec<RegisteredProjection>,
    aggregates: Vec<RegisteredAggregate>,
}

impl std::fmt::Debug for Admin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field(
                "projections",
                &self.projections.iter().map(|p| p.name).collect::<Vec<_>>(),
            )
            .field(
                "aggregates",
                &self
                    .aggregates
                    .iter()
                    .map(|a| a.stream_type)
                    .collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl Admin {
    /// The command line with nothing registered: what the ready binary runs.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers projection `P` (under [`Projection::NAME`]) for `rebuild`, `reset`, `skip` and
    /// a status that counts its lag in the events it handles. `setup` says how to run it on the
    /// store the URL opened; `None` where it does not run on that backend.
    pub fn projection<P: Projection>(
        mut self,
        setup: impl Fn(&Connection) -> Option<ProjectionSetup<P>> + Send + Sync + 'static,
    ) -> Self {
        self.projections.push(RegisteredProjection::new(setup));
        self
    }

    /// Registers aggregate `A`, so `show --state` folds streams of its type into its state (now,
    /// at a version, or as of a time).
    pub fn aggregate<A: cqrs_core::Aggregate + serde::Serialize>(mut self) -> Self {
        self.aggregates.push(RegisteredAggregate::new::<A>());
        self
    }

    /// Parses `args` (the program name first, as `std::env::args_os` gives them), runs the
    /// command on a runtime of its own, prints the outcome and returns the exit code. Call it
    /// from `main`, outside any tokio runtime; inside one, use [`Admin::execute`].
    pub fn run<I, T>(self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let runtime = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                eprintln!("error: cannot start the runtime: {error}");
                return ExitCode::from(Exit::Failed as u8);
            }
        };
        runtime.block_on(self.execute(args))
    }

    /// [`Admin::run`] on the caller's runtime.
    pub async fn execute<I, T>(&self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<OsString> + Clone,
    {
        let cli = match cli::Cli::try_parse_from(args) {
            Ok(cli) => cli,
            Err(error) => {
                let _ = error.print();
                return ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2));
            }
        };
        let mut stdout = std::io::stdout();
        match commands::run(self, &cli, &mut stdout).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                if cli.json {
                    let json = serde_json::json!({ "error": error.to_string(), "exit": error.exit() as u8 });
                    eprintln!("{json}");
                } else {
                    eprintln!("error: {error}");
                }
                ExitCode::from(error.exit() as u8)
            }
        }
    }

    /// Rebuilds registered projection `name` on `connection` from the start of the log,
    /// reporting progress after each batch: what `cqrs-admin rebuild` shows as a progress bar.
    /// Blue/green where it is set up so ([`ProjectionSetup::with_blue_green`]): beside the live
    /// version, resuming a build that was interrupted, then switching.
    pub async fn rebuild(
        &self,
        connection: &Connection,
        name: &str,
        mut progress: impl FnMut(Progress) + Send,
    ) -> Result<(), AdminError> {
        let ops = commands::projection_ops(self, connection, name)?;
        ops.rebuild(name, false, &mut progress).await
    }
}
