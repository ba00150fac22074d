//! PostgreSQL backend for `cqrs-core`: events, snapshots, checkpoints and read models in one
//! schema of a PostgreSQL database, for servers.
//!
//! [`PostgresStore`] implements the storage traits ([`EventStore`](cqrs_core::EventStore),
//! [`SnapshotStore`](cqrs_core::SnapshotStore), [`CheckpointStore`](cqrs_core::CheckpointStore)),
//! so a [`Repository`](cqrs_core::Repository) runs on it unchanged. [`PostgresProjections`] runs
//! projections whose read models are tables in the same database, each batch committed with its
//! checkpoint. Inline projections ([`PostgresStore::with_inline`]) and appends inside your own
//! transaction ([`PostgresStore::append_in`]) commit read models and events together.
//!
//! **Requirements.** PostgreSQL 13 or later: the log's `tx` column is an `xid8`.
//!
//! # Getting started
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use cqrs_core::prelude::*;
//! use cqrs_postgres::{PostgresProjections, PostgresStore};
//! use serde::{Deserialize, Serialize};
//!
//! #[event(name = "MoneyDeposited")]
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
//! pub struct MoneyDeposited { pub amount: i64 }
//!
//! #[derive(Debug, Default, Aggregate)]
//! #[aggregate(name = "account", events(MoneyDeposited))]
//! pub struct Account { balance: i64 }
//!
//! impl Apply<MoneyDeposited> for Account {
//!     fn apply(&mut self, e: &MoneyDeposited) { self.balance += e.amount }
//! }
//!
//! pub struct Deposit { pub amount: i64 }
//!
//! impl Handle<Deposit> for Account {
//!     type Error = std::convert::Infallible;
//!     fn handle(&self, cmd: &Deposit) -> Result<Vec<AccountEvent>, Self::Error> {
//!         Ok(vec![MoneyDeposited { amount: cmd.amount }.into()])
//!     }
//! }
//!
//! /// Balances in table `balances`: each batch of rows commits with the checkpoint.
//! #[derive(Debug, Default)]
//! pub struct Balances;
//!
//! #[projection(name = "balances")]
//! impl Balances {
//!     async fn deposited(
//!         &mut self,
//!         e: &MoneyDeposited,
//!         meta: &RecordedEvent,
//!         db: &mut sqlx::PgConnection,
//!     ) -> Result<(), sqlx::Error> {
//!         sqlx::query(
//!             "INSERT INTO balances (account, balance) VALUES ($1, $2)
//!              ON CONFLICT (account) DO UPDATE SET balance = balances.balance + EXCLUDED.balance",
//!         )
//!         .bind(meta.stream.id())
//!         .bind(e.amount)
//!         .execute(db)
//!         .await?;
//!         Ok(())
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // Connects and creates (or upgrades) the tables in schema `public`.
//!     let store = PostgresStore::open("postgres://postgres@127.0.0.1:5432/test").await?;
//!     sqlx::query("CREATE TABLE IF NOT EXISTS balances (account text PRIMARY KEY, balance bigint)")
//!         .execute(store.pool())
//!         .await?;
//!
//!     let accounts = Repository::<Account>::new(store.clone()).with_retry(RetryPolicy::retries(3));
//!     let balances = ProjectionRunner::new(Balances, PostgresProjections::new(store.clone())).spawn();
//!
//!     let written = accounts.execute("acc-42", &Deposit { amount: 100 }).await?;
//!     let position = written.position.expect("the deposit wrote an event");
//!     balances.wait_for(position, Duration::from_secs(5)).await?;
//!     let balance: i64 = sqlx::query_scalar("SELECT balance FROM balances WHERE account = $1")
//!         .bind("acc-42")
//!         .fetch_one(store.pool())
//!         .await?;
//!     println!("balance: {balance}");
//!     Ok(())
//! }
//! ```
//!
//! [`PostgresStore::open`] is the short path. For another schema, your own pool, or migrations
//! run by a deployment step, use the parts: [`PostgresStore::connect`] or [`PostgresStore::new`],
//! [`PostgresStore::with_schema`], [`PostgresStore::migrate`].
//!
//! # Connecting over TLS
//!
//! This crate turns on no TLS backend of sqlx: whether the connection uses rustls (with webpki
//! or the platform's roots) or native-tls is the application's choice. Turn one on in your own
//! dependency on sqlx 0.9 and Cargo builds the store's sqlx with it; the URL's `sslmode` then
//! applies (`?sslmode=require`, `verify-full`, ...):
//!
//! ```toml
//! sqlx = { version = "0.9", default-features = false, features = ["tls-rustls-ring-webpki"] }
//! ```
//!
//! Without a backend, a URL that requires TLS fails at connect with
//! [`StoreError::Connection`](cqrs_core::StoreError::Connection) ("SQLx was built without TLS
//! support"), and `sslmode=prefer` (the default) connects in plaintext.
//!
//! # Appending inside your transaction
//!
//! ```no_run
//! use cqrs_core::{EventId, EventStore, ExpectedVersion, NewEvent, StreamId};
//! use cqrs_postgres::PostgresStore;
//!
//! fn opened(owner: &str) -> NewEvent {
//!     NewEvent {
//!         event_id: EventId::new(),
//!         event_type: "Opened".into(),
//!         schema_version: 1,
//!         payload: serde_json::json!({ "owner": owner }),
//!         metadata: Default::default(),
//!     }
//! }
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PostgresStore::connect("postgres://postgres@127.0.0.1:5432/test")
//!     .await?
//!     .with_schema("bank")?;
//! store.migrate().await?; // explicit: creates or upgrades the schema's tables
//!
//! let account = StreamId::new("account", "acc-42");
//! let written = store.append(&account, ExpectedVersion::NoStream, vec![opened("ada")]).await?;
//! println!("at version {} and position {}", written.stream_version, written.position);
//!
//! // Append atomically with your own writes (an outbox row, a read model):
//! let mut tx = store.pool().begin().await?;
//! let expected = ExpectedVersion::Exact(written.stream_version);
//! store.append_in(&mut tx, &account, expected, vec![opened("bob")]).await?;
//! sqlx::query("INSERT INTO outbox (body) VALUES ('account opened')").execute(&mut *tx).await?;
//! tx.commit().await?;
//! # Ok(()) }
//! ```
//!
//! # How it works
//!
//! - **Schema.** One `events` table (global `position` identity, the writing transaction's
//!   `tx xid8`, stream type/id/version, unique event id, type, schema version, `json` payload and
//!   metadata (the text as written), `recorded_at`; primary key `(tx, position)`, the order of global reads),
//!   `snapshots` and `checkpoints`, created by [`PostgresStore::migrate`] from the embedded
//!   migrations in `migrations/` inside the configured schema ([`PostgresStore::with_schema`]).
//!   Every statement names the schema explicitly; only the validated, quoted schema name is
//!   spliced into SQL, every value is a bound parameter.
//! - **Append** is one statement per batch (`INSERT … SELECT`, the batch unnested from arrays or,
//!   for a single event, bound as scalars) that reads the stream's version, checks the
//!   expectation and inserts consecutive versions. The unique index on
//!   `(stream_type, stream_id, stream_version)` rejects the loser of a race (SQLSTATE 23505), which
//!   becomes a [`cqrs_core::ConcurrencyError`] with the actual version (`Any` and `StreamExists`
//!   retry instead). A 23505 on the event id means a retry: the ids are looked up and
//!   [`cqrs_core::backend::resolve_retry`] decides, exactly as for every other backend.
//! - **Wake-ups.** Committed appends are announced with `NOTIFY` on
//!   [`PostgresStore::notification_channel`], at most once per 2 ms: the first append (or group
//!   commit) of an interval notifies in its own statement, later ones are covered by the next,
//!   and a background task sends one trailing `NOTIFY` for what no append carried. A
//!   `pg_notify` inside every append would serialize all concurrent commits on PostgreSQL's
//!   notification lock. `append_in` always notifies in its statement, delivered when the caller
//!   commits.
//! - **Gap-free reads.** [`EventStore::read_all`](cqrs_core::EventStore::read_all) orders by
//!   `(tx, position)` and returns only events below the visibility horizon
//!   `pg_snapshot_xmin(pg_current_snapshot())`: every transaction below it has finished, and any
//!   later writer gets a larger `tx`, so nothing can commit behind a reader's cursor. One long
//!   transaction anywhere in the cluster holds the horizon back; [`PostgresStore::horizon`] says
//!   which. When a read comes back short while committed events wait above the horizon, it waits
//!   (up to [`PostgresStore::with_horizon_wait`]) for the in-flight transactions below them to
//!   finish, so a reader sees what was committed before it asked.
//! - **Immutability.** A trigger rejects `UPDATE`, `DELETE` and `TRUNCATE` on the events table.
//! - **Group commit** (on by default; [`PostgresStore::with_group_commit`] configures it,
//!   [`PostgresStore::without_group_commit`] turns it off): concurrent appends to
//!   different streams are written in one statement and one commit by whichever caller finds a
//!   free slot; each caller still gets its own result or concurrency error. Concurrent loads of
//!   commands that miss the aggregate cache (`read_stream_for_replay`) are read together in one
//!   statement in the same way. The slots keep their connections between writes, and commands'
//!   loads keep theirs, so both skip the pool's checkout round trips.
//!
//! **Round trips to the pool.** Everything else takes a connection from the `PgPool` per
//! operation. sqlx pings every connection it takes back (that one cannot be turned off) and, by
//! default, again on checkout: on a local database each ping costs about as much as a single-row
//! append. The pool of [`PostgresStore::connect`] ([`PostgresStore::pool_options`], to start a
//! pool of your own from) skips the checkout ping for a connection taken back less than half a
//! second ago; it pings one that sat idle longer, and every one for two seconds after a store in
//! the process saw a connection fail, so that a retry after a server restart gets a live one.
#![forbid(unsafe_code)]

mod admin;
mod append;
mod checkpoints;
mod error;
mod group;
mod horizon;
mod load;
mod notify;
mod pool;
mod projections;
mod read;
mod row;
mod snapshots;
mod sql;
mod store;
mod tx;
mod write;

use std::time::Duration;

pub use checkpoints::MAX_CHECKPOINT_NAME_LEN;
pub use error::{map_error, SchemaMismatch};
pub use group::GroupCommit;
pub use horizon::{Horizon, HorizonHolder};
pub use notify::AppendListener;
pub use projections::PostgresProjections;
pub use sql::MAX_SCHEMA_LEN;
pub use store::PostgresStore;

/// The embedded migrations (`cqrs-postgres/migrations/`), applied by [`PostgresStore::migrate`].
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The read-database migrations (`cqrs-postgres/read-migrations/`), applied by
/// [`PostgresProjections::migrate`] to a read database fed from another event store.
static READ_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./read-migrations");

/// Default for [`PostgresStore::with_horizon_wait`].
pub const DEFAULT_HORIZON_WAIT: Duration = Duration::from_secs(5);
