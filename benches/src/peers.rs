//! cqrs-es 0.5 with postgres-es 0.5 (from crates.io), on the same workload and JSON payloads.
//! Built only with `--features peers`.

use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{Aggregate, CqrsFramework, DomainEvent, EventStore};
use postgres_es::PostgresEventRepository;
use serde::{Deserialize, Serialize};
use sqlx08::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};

use crate::domain::{BankError, Cmd};
use crate::w1::Contender;
use crate::{db, BenchError};

/// The account, as cqrs-es wants it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct PeerAccount {
    open: bool,
    balance: i64,
    deposits: u64,
}

/// The account's events; each variant's body is the same JSON as our event's payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[allow(clippy::enum_variant_names)]
pub enum PeerEvent {
    /// Opened.
    AccountOpened {
        /// Owner.
        owner: String,
    },
    /// Deposited.
    MoneyDeposited {
        /// Cents.
        amount: i64,
        /// Memo.
        memo: String,
    },
}

impl DomainEvent for PeerEvent {
    fn event_type(&self) -> String {
        match self {
            PeerEvent::AccountOpened { .. } => "AccountOpened",
            PeerEvent::MoneyDeposited { .. } => "MoneyDeposited",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

impl Aggregate for PeerAccount {
    const TYPE: &'static str = "account";
    type Command = Cmd;
    type Event = PeerEvent;
    type Error = BankError;
    type Services = ();

    async fn handle(
        &mut self,
        command: Cmd,
        _services: &(),
        sink: &cqrs_es::event_sink::EventSink<Self>,
    ) -> Result<(), BankError> {
        command.validate(self.open)?;
        let event = match command {
            Cmd::Open { owner } => PeerEvent::AccountOpened { owner },
            Cmd::Deposit { amount, memo } => PeerEvent::MoneyDeposited { amount, memo },
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: PeerEvent) {
        match event {
            PeerEvent::AccountOpened { .. } => self.open = true,
            PeerEvent::MoneyDeposited { amount, .. } => {
                self.balance += amount;
                self.deposits += 1;
            }
        }
    }
}

type Store = PersistedEventStore<PostgresEventRepository, PeerAccount>;

/// cqrs-es on its own schema, with postgres-es's tables (from its `db/init.sql`).
pub struct CqrsEs {
    cqrs: CqrsFramework<PeerAccount, Store>,
    /// A second store over the same tables, to time loads alone.
    loader: Store,
    pool: PgPool,
    schema: String,
}

fn repo(pool: &PgPool, schema: &str) -> PostgresEventRepository {
    PostgresEventRepository::new(pool.clone()).with_tables(
        &format!("\"{schema}\".events"),
        &format!("\"{schema}\".snapshots"),
    )
}

fn store(pool: &PgPool, schema: &str, snapshot_every: Option<usize>) -> Store {
    match snapshot_every {
        Some(n) => PersistedEventStore::new_snapshot_store(repo(pool, schema), n),
        None => PersistedEventStore::new_event_store(repo(pool, schema)),
    }
}

impl CqrsEs {
    /// A fresh schema; `snapshot_every` selects cqrs-es's snapshot store.
    pub async fn new(
        url: &str,
        name: &str,
        snapshot_every: Option<usize>,
    ) -> Result<Self, BenchError> {
        let schema = db::schema_name(name);
        // Plaintext, like every other contender. sqlite-es's sqlx 0.8 dependency turns on rustls
        // for the whole sqlx 0.8 build (feature unification), and with the default
        // `sslmode=prefer` postgres-es would then talk TLS to a server with `ssl = on`: about a
        // fifth more CPU per command, a handicap that is not cqrs-es's own.
        let options: PgConnectOptions = url.parse()?;
        let pool = PgPoolOptions::new()
            .max_connections(db::POOL_SIZE)
            .connect_with(options.ssl_mode(PgSslMode::Disable))
            .await?;
        let tls: bool =
            sqlx08::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&pool)
                .await?;
        if tls {
            return Err("cqrs-es's connection uses TLS; the other contenders' do not".into());
        }
        let mut held = Vec::new();
        for _ in 0..db::POOL_SIZE {
            held.push(pool.acquire().await?);
        }
        drop(held);
        for sql in [
            format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"),
            format!("CREATE SCHEMA \"{schema}\""),
            // postgres-es 0.5 db/init.sql, in our schema.
            format!(
                "CREATE TABLE \"{schema}\".events (
                    aggregate_type text NOT NULL, aggregate_id text NOT NULL,
                    sequence bigint CHECK (sequence >= 0) NOT NULL,
                    event_type text NOT NULL, event_version text NOT NULL,
                    payload json NOT NULL, metadata json NOT NULL,
                    PRIMARY KEY (aggregate_type, aggregate_id, sequence))"
            ),
            format!(
                "CREATE TABLE \"{schema}\".snapshots (
                    aggregate_type text NOT NULL, aggregate_id text NOT NULL,
                    last_sequence bigint CHECK (last_sequence >= 0) NOT NULL,
                    current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
                    payload json NOT NULL,
                    PRIMARY KEY (aggregate_type, aggregate_id, last_sequence))"
            ),
        ] {
            sqlx08::query(&sql).execute(&pool).await?;
        }
        let cqrs = CqrsFramework::new(store(&pool, &schema, snapshot_every), vec![], ());
        let loader = store(&pool, &schema, snapshot_every);
        Ok(Self {
            cqrs,
            loader,
            pool,
            schema,
        })
    }

    /// Writes `AccountOpened` plus `deposits` deposits to account `id` directly (one statement),
    /// exactly as cqrs-es would have stored them.
    pub async fn seed(&self, id: &str, deposits: usize) -> Result<(), BenchError> {
        let mut sequences = Vec::new();
        let mut types = Vec::new();
        let mut payloads = Vec::new();
        let mut event = PeerEvent::AccountOpened {
            owner: "Owner".to_owned(),
        };
        for n in 0..=deposits {
            if n > 0 {
                event = PeerEvent::MoneyDeposited {
                    amount: 100,
                    memo: crate::domain::memo(0, n),
                };
            }
            sequences.push(i64::try_from(n + 1)?);
            types.push(event.event_type());
            payloads.push(serde_json::to_string(&event)?);
        }
        sqlx08::query(&format!(
            "INSERT INTO \"{}\".events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata)
             SELECT 'account', $1, s, t, '1', p::json, '{{}}'::json FROM UNNEST($2::bigint[], $3::text[], $4::text[]) AS u(s, t, p)",
            self.schema
        ))
        .bind(id)
        .bind(&sequences)
        .bind(&types)
        .bind(&payloads)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Loads account `id` (no command), returning its deposit count.
    pub async fn load(&self, id: &str) -> Result<u64, BenchError> {
        let context = self
            .loader
            .load_aggregate(id)
            .await
            .map_err(|e| e.to_string())?;
        Ok(context.aggregate.deposits)
    }
}

impl Contender for CqrsEs {
    async fn execute(&self, id: &str, cmd: &Cmd) -> Result<(), BenchError> {
        self.cqrs
            .execute(id, cmd.clone())
            .await
            .map_err(|e| e.to_string().into())
    }

    async fn stored_events(&self) -> Result<i64, BenchError> {
        Ok(
            sqlx08::query_scalar(&format!("SELECT count(*) FROM \"{}\".events", self.schema))
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn finish(self) -> Result<(), BenchError> {
        sqlx08::query(&format!(
            "DROP SCHEMA IF EXISTS \"{}\" CASCADE",
            self.schema
        ))
        .execute(&self.pool)
        .await?;
        self.pool.close().await;
        Ok(())
    }
}

type SqliteEsStore = PersistedEventStore<sqlite_es::SqliteEventRepository, PeerAccount>;

/// cqrs-es on SQLite with sqlite-es 0.5, on a file of its own: WAL, `synchronous = FULL` (the
/// durability every SQLite contender gets; sqlite-es's own `default_sqlite_pool` would use
/// `NORMAL`), the tables of its `migrations/`, a pool of [`db::POOL_SIZE`] connections.
pub struct SqliteEs {
    cqrs: CqrsFramework<PeerAccount, SqliteEsStore>,
    pool: sqlx08::sqlite::SqlitePool,
    path: std::path::PathBuf,
}

impl SqliteEs {
    /// A fresh database at `path`.
    pub async fn new(path: &std::path::Path) -> Result<Self, BenchError> {
        use sqlx08::sqlite::{
            SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous,
        };
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(std::time::Duration::from_secs(30));
        let pool = SqlitePoolOptions::new()
            .max_connections(db::POOL_SIZE)
            .connect_with(options)
            .await?;
        let mut held = Vec::new();
        for _ in 0..db::POOL_SIZE {
            held.push(pool.acquire().await?);
        }
        drop(held);
        // sqlite-es 0.5 migrations/20221114171845_init.sql (without its test view and test row).
        for sql in [
            "CREATE TABLE events (
                aggregate_type text NOT NULL, aggregate_id text NOT NULL,
                sequence integer CHECK (sequence >= 0) NOT NULL,
                event_type text NOT NULL, event_version text NOT NULL,
                payload text NOT NULL, metadata text NOT NULL,
                PRIMARY KEY (aggregate_type, aggregate_id, sequence)) STRICT",
            "CREATE TABLE snapshots (
                aggregate_type text NOT NULL, aggregate_id text NOT NULL,
                last_sequence integer CHECK (last_sequence >= 0) NOT NULL,
                current_snapshot integer CHECK (current_snapshot >= 0) NOT NULL,
                payload text NOT NULL,
                PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)) STRICT",
        ] {
            sqlx08::query(sql).execute(&pool).await?;
        }
        let repo = sqlite_es::SqliteEventRepository::new(pool.clone());
        let cqrs = CqrsFramework::new(PersistedEventStore::new_event_store(repo), vec![], ());
        Ok(Self {
            cqrs,
            pool,
            path: path.to_owned(),
        })
    }
}

impl Contender for SqliteEs {
    async fn execute(&self, id: &str, cmd: &Cmd) -> Result<(), BenchError> {
        self.cqrs
            .execute(id, cmd.clone())
            .await
            .map_err(|e| e.to_string().into())
    }

    async fn stored_events(&self) -> Result<i64, BenchError> {
        Ok(sqlx08::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&self.pool)
            .await?)
    }

    async fn finish(self) -> Result<(), BenchError> {
        drop(self.cqrs);
        self.pool.close().await;
        crate::sqlite::remove_db(&self.path);
        Ok(())
    }
}

impl crate::contention::Attempting for CqrsEs {
    async fn attempt(&self, id: &str, cmd: &Cmd) -> Result<crate::contention::Attempt, BenchError> {
        match self.cqrs.execute(id, cmd.clone()).await {
            Ok(()) => Ok(crate::contention::Attempt::Done),
            Err(cqrs_es::AggregateError::AggregateConflict) => {
                Ok(crate::contention::Attempt::Conflict)
            }
            Err(e) => Err(e.to_string().into()),
        }
    }
}
