//! The store value: its pool, schema, configuration and migrations.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use cqrs_core::{Position, StoreError};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::Executor;

use crate::error::{map_error, map_error_in};
use crate::{group, notify, sql, AppendListener, GroupCommit, DEFAULT_HORIZON_WAIT, MIGRATOR};

/// The events, snapshots and checkpoints of one schema. Cheap to clone: clones share the pool and
/// the group-commit writer.
///
/// Defaults: schema `public`, group commit on with [`GroupCommit::default`] (turn it off with
/// [`PostgresStore::without_group_commit`]), horizon wait [`DEFAULT_HORIZON_WAIT`].
///
/// Needs PostgreSQL 13 or later. [`PostgresStore::open`] connects and migrates schema `public`;
/// the builder methods configure the rest, each returning the store:
///
/// ```no_run
/// use std::time::Duration;
/// use cqrs_postgres::{GroupCommit, PostgresStore};
/// use sqlx::postgres::PgPoolOptions;
///
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// let pool = PgPoolOptions::new()
///     .max_connections(20)
///     .connect("postgres://postgres@127.0.0.1:5432/app")
///     .await?;
/// let store = PostgresStore::new(pool)
///     .with_schema("bank")? // validated, then quoted into every statement
///     .with_horizon_wait(Duration::from_secs(2))
///     .with_group_commit(GroupCommit::default().with_max_batch(32));
/// store.migrate().await?; // or in a deployment step
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresStore {
    pub(crate) pool: PgPool,
    pub(crate) sql: Arc<sql::Statements>,
    pub(crate) horizon_wait: Duration,
    pub(crate) notifier: Arc<OnceLock<Arc<notify::Notifier>>>,
    pub(crate) announcer: Arc<OnceLock<Arc<notify::Announcer>>>,
    pub(crate) group: Option<Arc<group::GroupCommitter>>,
    pub(crate) inline: cqrs_core::backend::InlineProjections<PgConnection>,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.sql.schema)
            .field("horizon_wait", &self.horizon_wait)
            .field("group_commit", &self.group.as_ref().map(|g| g.config()))
            .field("inline", &self.inline.names())
            .finish_non_exhaustive()
    }
}

impl PostgresStore {
    /// Connects a pool of up to 10 connections to `url` ([`PostgresStore::pool_options`]); the
    /// store uses schema `public`.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let pool = Self::pool_options().connect(url).await.map_err(map_error)?;
        Ok(Self::new(pool))
    }

    /// The pool options [`PostgresStore::connect`] uses, to start a pool of your own from (for
    /// another size, timeouts, TLS): up to 10 connections, health-checked on checkout only where
    /// the check can find something. sqlx pings every connection it takes back (and closes one
    /// that fails), so a connection taken back less than half a second ago is handed out again
    /// without another ping, and an operation on the pool skips that round trip; a connection
    /// idle for longer is pinged, as sqlx does by default, and so is every connection for two
    /// seconds after a store in this process saw one fail (a server restart or failover closes
    /// them all), so that the store's retries get a live one.
    ///
    /// ```no_run
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let pool = cqrs_postgres::PostgresStore::pool_options()
    ///     .max_connections(32)
    ///     .connect("postgres://postgres@127.0.0.1:5432/app")
    ///     .await?;
    /// let store = cqrs_postgres::PostgresStore::new(pool);
    /// # Ok(()) }
    /// ```
    pub fn pool_options() -> PgPoolOptions {
        crate::pool::options()
    }

    /// The short path: connects (as [`PostgresStore::connect`]) and applies the migrations (as
    /// [`PostgresStore::migrate`]), schema `public`. For another schema, a pool of your own or
    /// migrations run by a deployment step, use the parts.
    ///
    /// Needs PostgreSQL 13 or later (the log uses the `xid8` type).
    pub async fn open(url: &str) -> Result<Self, StoreError> {
        let store = Self::connect(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// A store on an existing pool, using schema `public`, with group commit on.
    pub fn new(pool: PgPool) -> Self {
        let sql = Arc::new(sql::Statements::new("public"));
        let announcer = Arc::default();
        Self {
            group: Some(group::GroupCommitter::new(
                pool.clone(),
                sql.clone(),
                Arc::clone(&announcer),
                GroupCommit::default(),
            )),
            pool,
            sql,
            horizon_wait: DEFAULT_HORIZON_WAIT,
            notifier: Arc::default(),
            announcer,
            inline: cqrs_core::backend::InlineProjections::default(),
        }
    }

    /// Uses schema `schema` for every table: `[a-z_][a-z0-9_]*`, at most [`MAX_SCHEMA_LEN`](crate::MAX_SCHEMA_LEN) bytes,
    /// not a system schema (`pg_*`, `information_schema`). The name is validated, then quoted into
    /// the statements.
    pub fn with_schema(mut self, schema: &str) -> Result<Self, StoreError> {
        sql::validate_schema(schema)?;
        self.sql = Arc::new(sql::Statements::new(schema));
        self.notifier = Arc::default();
        self.announcer = Arc::default();
        if let Some(group) = &self.group {
            self.group = Some(group::GroupCommitter::new(
                self.pool.clone(),
                self.sql.clone(),
                Arc::clone(&self.announcer),
                group.config(),
            ));
        }
        Ok(self)
    }

    /// How long [`EventStore::read_all`](cqrs_core::EventStore::read_all) may wait when it comes back short while events committed
    /// before the call are still held above the visibility horizon by older, running
    /// transactions (default [`DEFAULT_HORIZON_WAIT`]). The wait ends as soon as they finish.
    /// `Duration::ZERO` returns at once with what is below the horizon.
    pub fn with_horizon_wait(mut self, wait: Duration) -> Self {
        self.horizon_wait = wait;
        self
    }

    /// Group commit with `config` instead of [`GroupCommit::default`] (it is on by default).
    ///
    /// Group commit routes [`EventStore::append`](cqrs_core::EventStore::append): concurrent appends to different
    /// streams are written in one statement and one transaction, by whichever caller leads the
    /// group (see [`GroupCommit`]); each caller still gets its own result or error. A lone append
    /// is written as usual. [`PostgresStore::append_in`] is unaffected (it uses the caller's
    /// transaction). Concurrent loads of different streams
    /// ([`EventStore::read_stream_for_replay`](cqrs_core::EventStore::read_stream_for_replay), what
    /// a command that misses the aggregate cache reads) are grouped the same way: one statement
    /// reads them all, and a lone load reads alone.
    ///
    /// Each of the `max_in_flight` slots keeps its pooled connection from write to write (for
    /// [`GroupCommit::keep_connection`] once appends pause, and never the pool's last idle one),
    /// which skips the two pings sqlx's pool spends on every checkout; a command's load
    /// ([`EventStore::read_stream`](cqrs_core::EventStore::read_stream)) borrows an idle kept connection too. So up to
    /// `max_in_flight` connections of the pool are the store's while commands flow, and
    /// `PgPool::close` waits for them until the store is dropped or the keep time runs out.
    ///
    /// It trades parallelism for fewer statements, commits and round trips: concurrent commands
    /// on different streams share one statement and one commit, and every write skips the pool's
    /// round trips (BENCHMARKS.md, W1, has the figures). Appends of one stream are never grouped
    /// together: an append whose stream is already queued or being written is written alone at
    /// once, on a pooled connection, as without group commit (BENCHMARKS.md, W3).
    pub fn with_group_commit(mut self, config: GroupCommit) -> Self {
        self.group = Some(group::GroupCommitter::new(
            self.pool.clone(),
            self.sql.clone(),
            Arc::clone(&self.announcer),
            config,
        ));
        self
    }

    /// Writes every append in its own transaction on a connection checked out of the pool for
    /// it, and reads every load on its own, with no grouping and no kept connections.
    pub fn without_group_commit(mut self) -> Self {
        self.group = None;
        self
    }

    /// Runs `projection` inside every append of this store (and its clones made afterwards):
    /// its handlers get the append's transaction (`type Context = sqlx::PgConnection`), so the
    /// events and the read-model rows commit together or not at all. A handler error fails the
    /// append with [`StoreError::InlineProjection`] and nothing is written. An idempotent retry of
    /// stored events does not run it again.
    ///
    /// The value is cloned for each append and the clone dropped afterwards: keep the read
    /// model's state in the database. Appends with inline projections bypass group commit (each
    /// runs its own transaction), and [`PostgresStore::append_in`] runs them in the caller's
    /// transaction. Use inline projections for read models that must never lag (uniqueness
    /// checks, balances shown right after a command); everything else is cheaper asynchronous
    /// ([`PostgresProjections`](crate::PostgresProjections)).
    pub fn with_inline<P>(mut self, projection: P) -> Self
    where
        P: cqrs_core::Projection<Context = PgConnection> + Clone + Sync,
    {
        self.inline = self.inline.with(projection);
        self
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema this store uses.
    pub fn schema(&self) -> &str {
        &self.sql.schema
    }

    /// The `LISTEN/NOTIFY` channel appends are announced on after they commit: `<schema>_events`,
    /// with the position of the last appended event (`"<tx>.<sequence>"`) as payload. Announcements
    /// are coalesced: one notification may cover several appends.
    pub fn notification_channel(&self) -> &str {
        &self.sql.channel
    }

    /// Applies the embedded migrations to this store's schema, creating the schema if needed.
    /// Idempotent, and safe to run from several processes at once (sqlx's migration lock).
    ///
    /// The migrations are plain SQL with unqualified names; they run on a dedicated connection
    /// whose `search_path` is set to the schema only (so they land there), with the migration
    /// history in `<schema>._sqlx_migrations`. The connection is closed afterwards, never
    /// returned to the pool.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_error)?.detach();
        let result = self.migrate_on(&mut conn).await;
        let _ = sqlx::Connection::close(conn).await;
        result
    }

    pub(crate) async fn migrate_on(&self, conn: &mut PgConnection) -> Result<(), StoreError> {
        self.run_migrations(conn, &MIGRATOR, "_sqlx_migrations")
            .await
    }

    /// Applies the read-database migrations (`read-migrations/`: checkpoints, skips, processed
    /// events; no events table) to this schema, history in `<schema>._cqrs_read_migrations`.
    pub(crate) async fn migrate_read_database(&self) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await.map_err(map_error)?.detach();
        let result = self
            .run_migrations(&mut conn, &crate::READ_MIGRATOR, "_cqrs_read_migrations")
            .await;
        let _ = sqlx::Connection::close(conn).await;
        result
    }

    async fn run_migrations(
        &self,
        conn: &mut PgConnection,
        migrations: &sqlx::migrate::Migrator,
        history: &str,
    ) -> Result<(), StoreError> {
        let quoted = &self.sql.quoted;
        conn.execute(sqlx::AssertSqlSafe(format!("SET search_path TO {quoted}")))
            .await
            .map_err(map_error)?;
        let mut migrator =
            sqlx::migrate::Migrator::with_migrations(migrations.iter().cloned().collect());
        migrator.create_schema(quoted.clone());
        migrator.dangerous_set_table_name(format!("{quoted}.{history}"));
        // `run_direct` on the connection itself rather than `run` (which takes an `Acquire`
        // whose future the compiler cannot prove `Send`): `migrate` must be spawnable.
        migrator
            .run_direct(None, conn, false)
            .await
            .map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(e) => map_error(e),
                other => StoreError::Backend(Box::new(other)),
            })
    }

    /// Listens for appends on this store's channel (one connection from the pool, held until the
    /// listener is dropped).
    pub async fn listen(&self) -> Result<AppendListener, StoreError> {
        AppendListener::new(&self.pool, &self.sql.channel).await
    }

    /// Tells listeners (in every process) that an append committed up to `position`.
    pub(crate) fn announce(&self, position: Position) {
        if let Some(notifier) = self.notifier.get() {
            notifier.appended(position);
        }
        self.announcer().announce(position);
    }

    pub(crate) fn announcer(&self) -> &notify::Announcer {
        self.announcer
            .get_or_init(|| notify::Announcer::start(&self.pool, self.sql.clone()))
    }

    pub(crate) fn fail(&self, error: sqlx::Error) -> StoreError {
        map_error_in(&self.sql.schema, error)
    }
}
