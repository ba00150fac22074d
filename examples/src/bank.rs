//! The bank account domain: open, deposit, withdraw, with `InsufficientFunds`.

use std::collections::BTreeMap;

use cqrs_core::prelude::*;
use cqrs_core::{event, projection};
use serde::{Deserialize, Serialize};

/// An account was opened for `owner`.
#[event(name = "AccountOpened")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountOpened {
    /// Who owns it.
    pub owner: String,
}

/// Money was paid in.
#[event(name = "MoneyDeposited")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoneyDeposited {
    /// Amount in cents.
    pub amount: i64,
    /// Free text shown on the statement.
    pub memo: String,
}

/// Money was paid out.
#[event(name = "MoneyWithdrawn")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoneyWithdrawn {
    /// Amount in cents.
    pub amount: i64,
}

/// A bank account: its state is only what decisions need.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, Aggregate)]
#[aggregate(
    name = "account",
    events(AccountOpened, MoneyDeposited, MoneyWithdrawn)
)]
pub struct Account {
    /// Whether the account was opened.
    pub open: bool,
    /// Balance in cents.
    pub balance: i64,
}

impl Apply<AccountOpened> for Account {
    fn apply(&mut self, _: &AccountOpened) {
        self.open = true;
    }
}

impl Apply<MoneyDeposited> for Account {
    fn apply(&mut self, event: &MoneyDeposited) {
        self.balance += event.amount;
    }
}

impl Apply<MoneyWithdrawn> for Account {
    fn apply(&mut self, event: &MoneyWithdrawn) {
        self.balance -= event.amount;
    }
}

/// Why the bank refuses a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BankError {
    /// The account is already open.
    #[error("account is already open")]
    AlreadyOpen,
    /// The account was never opened.
    #[error("account is not open")]
    NotOpen,
    /// Amounts must be positive.
    #[error("amount must be positive, got {0}")]
    NonPositiveAmount(i64),
    /// The balance does not cover the withdrawal.
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    InsufficientFunds {
        /// Current balance.
        balance: i64,
        /// Requested amount.
        requested: i64,
    },
}

/// Open an account.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OpenAccount {
    /// Owner's name.
    pub owner: String,
}

/// Deposit money.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deposit {
    /// Amount in cents.
    pub amount: i64,
    /// Statement text.
    pub memo: String,
}

/// Withdraw money.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Withdraw {
    /// Amount in cents.
    pub amount: i64,
}

fn positive(amount: i64) -> Result<(), BankError> {
    if amount > 0 {
        Ok(())
    } else {
        Err(BankError::NonPositiveAmount(amount))
    }
}

impl Handle<OpenAccount> for Account {
    type Error = BankError;
    fn handle(&self, command: &OpenAccount) -> Result<Vec<AccountEvent>, BankError> {
        if self.open {
            return Err(BankError::AlreadyOpen);
        }
        Ok(vec![AccountOpened {
            owner: command.owner.clone(),
        }
        .into()])
    }
}

impl Handle<Deposit> for Account {
    type Error = BankError;
    fn handle(&self, command: &Deposit) -> Result<Vec<AccountEvent>, BankError> {
        if !self.open {
            return Err(BankError::NotOpen);
        }
        positive(command.amount)?;
        Ok(vec![MoneyDeposited {
            amount: command.amount,
            memo: command.memo.clone(),
        }
        .into()])
    }
}

impl Handle<Withdraw> for Account {
    type Error = BankError;
    fn handle(&self, command: &Withdraw) -> Result<Vec<AccountEvent>, BankError> {
        if !self.open {
            return Err(BankError::NotOpen);
        }
        positive(command.amount)?;
        if command.amount > self.balance {
            return Err(BankError::InsufficientFunds {
                balance: self.balance,
                requested: command.amount,
            });
        }
        Ok(vec![MoneyWithdrawn {
            amount: command.amount,
        }
        .into()])
    }
}

macro_rules! routed_by_account {
    ($($command:ty),*) => {$(
        impl Command for $command {
            type Aggregate = Account;
        }
    )*};
}
routed_by_account!(OpenAccount, Deposit, Withdraw);

/// Read model: balance and number of movements per account.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Balances {
    /// Balance in cents by account id.
    pub balances: BTreeMap<String, i64>,
    /// Deposits and withdrawals seen by account id.
    pub movements: BTreeMap<String, u32>,
}

#[projection(name = "balances")]
impl Balances {
    fn on_opened(&mut self, _: &AccountOpened, meta: &RecordedEvent) {
        self.balances.insert(meta.stream.id().to_owned(), 0);
    }

    fn on_deposited(&mut self, event: &MoneyDeposited, meta: &RecordedEvent) {
        self.change(meta, event.amount);
    }

    fn on_withdrawn(&mut self, event: &MoneyWithdrawn, meta: &RecordedEvent) {
        self.change(meta, -event.amount);
    }

    #[helper]
    fn change(&mut self, meta: &RecordedEvent, delta: i64) {
        let account = meta.stream.id().to_owned();
        *self.balances.entry(account.clone()).or_default() += delta;
        *self.movements.entry(account).or_default() += 1;
    }
}

/// The same read model in SQL, in table `bank_balances` of the store's SQLite file: run by
/// [`cqrs_sqlite::SqliteProjections`], each batch of rows commits with the projection's
/// checkpoint, so the table survives restarts and a second run continues where the first stopped.
///
/// The value names the table it writes: [`SqlBalances::live`] the one readers query,
/// [`SqlBalances::building`] the one a blue/green rebuild (`bank-admin rebuild bank_balances`)
/// fills beside it before switching.
#[derive(Debug, Clone)]
pub struct SqlBalances {
    table: &'static str,
}

impl Default for SqlBalances {
    fn default() -> Self {
        Self::live()
    }
}

impl SqlBalances {
    /// The table readers query.
    pub const TABLE: &'static str = "bank_balances";
    /// The table a blue/green rebuild fills, renamed to [`SqlBalances::TABLE`] by its switch.
    pub const BUILDING: &'static str = "bank_balances__next";

    /// The projection writing the live table.
    pub fn live() -> Self {
        Self { table: Self::TABLE }
    }

    /// The projection writing the table a blue/green rebuild fills.
    pub fn building() -> Self {
        Self {
            table: Self::BUILDING,
        }
    }

    /// Creates the live table if needed.
    pub async fn create(store: &cqrs_sqlite::SqliteStore) -> Result<(), sqlx::Error> {
        Self::create_table(store, Self::TABLE).await
    }

    async fn create_table(
        store: &cqrs_sqlite::SqliteStore,
        table: &'static str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {table} \
             (account TEXT PRIMARY KEY, balance INTEGER NOT NULL, movements INTEGER NOT NULL)"
        )))
        .execute(store.pool())
        .await?;
        Ok(())
    }

    /// Empties the live table (creating it if needed), before an in-place rebuild.
    pub async fn clear(store: &cqrs_sqlite::SqliteStore) -> Result<(), sqlx::Error> {
        Self::create(store).await?;
        sqlx::query("DELETE FROM bank_balances")
            .execute(store.pool())
            .await?;
        Ok(())
    }

    /// Creates the table a blue/green rebuild fills, empty (dropping what an interrupted
    /// rebuild left in it).
    pub async fn prepare(store: &cqrs_sqlite::SqliteStore) -> Result<(), sqlx::Error> {
        sqlx::query("DROP TABLE IF EXISTS bank_balances__next")
            .execute(store.pool())
            .await?;
        Self::create_table(store, Self::BUILDING).await
    }

    /// An account's balance as the live table shows it.
    pub async fn balance(
        store: &cqrs_sqlite::SqliteStore,
        account: &str,
    ) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar("SELECT balance FROM bank_balances WHERE account = ?1")
            .bind(account)
            .fetch_optional(store.pool())
            .await
    }

    /// How many accounts the live table holds (this run's and earlier runs').
    pub async fn accounts(store: &cqrs_sqlite::SqliteStore) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT count(*) FROM bank_balances")
            .fetch_one(store.pool())
            .await
    }
}

#[projection(name = "bank_balances")]
impl SqlBalances {
    async fn on_opened(
        &mut self,
        _: &AccountOpened,
        meta: &RecordedEvent,
        db: &mut sqlx::SqliteConnection,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} (account, balance, movements) VALUES (?1, 0, 0) \
             ON CONFLICT (account) DO NOTHING",
            self.table
        )))
        .bind(meta.stream.id())
        .execute(db)
        .await?;
        Ok(())
    }

    async fn on_deposited(
        &mut self,
        event: &MoneyDeposited,
        meta: &RecordedEvent,
        db: &mut sqlx::SqliteConnection,
    ) -> Result<(), sqlx::Error> {
        Self::change(self.table, db, meta, event.amount).await
    }

    async fn on_withdrawn(
        &mut self,
        event: &MoneyWithdrawn,
        meta: &RecordedEvent,
        db: &mut sqlx::SqliteConnection,
    ) -> Result<(), sqlx::Error> {
        Self::change(self.table, db, meta, -event.amount).await
    }

    #[helper]
    async fn change(
        table: &str,
        db: &mut sqlx::SqliteConnection,
        meta: &RecordedEvent,
        delta: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {table} (account, balance, movements) VALUES (?1, ?2, 1) \
             ON CONFLICT (account) DO UPDATE SET balance = balance + excluded.balance, \
             movements = movements + 1"
        )))
        .bind(meta.stream.id())
        .bind(delta)
        .execute(db)
        .await?;
        Ok(())
    }
}

/// The bank's balances in PostgreSQL, in table `bank_balances` of the store's schema, run by
/// [`cqrs_postgres::PostgresProjections`]: what `bank-admin` rebuilds (blue/green) on a
/// `postgres://` URL. Like [`SqlBalances`], the value names the table it writes.
#[derive(Debug, Clone)]
pub struct PgBalances {
    /// The schema-qualified, quoted table.
    table: String,
}

impl PgBalances {
    /// The projection writing the live table `bank_balances` of `store`'s schema.
    pub fn live(store: &cqrs_postgres::PostgresStore) -> Self {
        Self::writing(store, SqlBalances::TABLE)
    }

    /// The projection writing `bank_balances__next`, which a blue/green rebuild fills.
    pub fn building(store: &cqrs_postgres::PostgresStore) -> Self {
        Self::writing(store, SqlBalances::BUILDING)
    }

    fn writing(store: &cqrs_postgres::PostgresStore, table: &str) -> Self {
        // The store validated its schema name (`[a-z_][a-z0-9_]*`): it needs no escaping.
        Self {
            table: format!("\"{}\".\"{table}\"", store.schema()),
        }
    }

    /// Creates the table this value writes, if needed.
    pub async fn create(&self, store: &cqrs_postgres::PostgresStore) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE IF NOT EXISTS {} \
             (account text PRIMARY KEY, balance bigint NOT NULL, movements bigint NOT NULL)",
            self.table
        )))
        .execute(store.pool())
        .await?;
        Ok(())
    }

    /// Creates the table this value writes, empty (dropping what was in it).
    pub async fn prepare(&self, store: &cqrs_postgres::PostgresStore) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP TABLE IF EXISTS {}",
            self.table
        )))
        .execute(store.pool())
        .await?;
        self.create(store).await
    }

    /// Every account's balance and movements as the table shows them, by account.
    pub async fn rows(
        &self,
        store: &cqrs_postgres::PostgresStore,
    ) -> Result<Vec<(String, i64, i64)>, sqlx::Error> {
        sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT account, balance, movements FROM {} ORDER BY account",
            self.table
        )))
        .fetch_all(store.pool())
        .await
    }
}

#[projection(name = "bank_balances")]
impl PgBalances {
    async fn on_opened(
        &mut self,
        _: &AccountOpened,
        meta: &RecordedEvent,
        db: &mut sqlx::PgConnection,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} (account, balance, movements) VALUES ($1, 0, 0) \
             ON CONFLICT (account) DO NOTHING",
            self.table
        )))
        .bind(meta.stream.id())
        .execute(db)
        .await?;
        Ok(())
    }

    async fn on_deposited(
        &mut self,
        event: &MoneyDeposited,
        meta: &RecordedEvent,
        db: &mut sqlx::PgConnection,
    ) -> Result<(), sqlx::Error> {
        Self::change(&self.table, db, meta, event.amount).await
    }

    async fn on_withdrawn(
        &mut self,
        event: &MoneyWithdrawn,
        meta: &RecordedEvent,
        db: &mut sqlx::PgConnection,
    ) -> Result<(), sqlx::Error> {
        Self::change(&self.table, db, meta, -event.amount).await
    }

    #[helper]
    async fn change(
        table: &str,
        db: &mut sqlx::PgConnection,
        meta: &RecordedEvent,
        delta: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {table} AS t (account, balance, movements) VALUES ($1, $2, 1) \
             ON CONFLICT (account) DO UPDATE SET balance = t.balance + EXCLUDED.balance, \
             movements = t.movements + 1"
        )))
        .bind(meta.stream.id())
        .bind(delta)
        .execute(db)
        .await?;
        Ok(())
    }
}

/// The `cqrs-admin` command line with the bank registered: [`Account`] (for `show --state`) and
/// the balances read model, rebuilt blue/green: [`SqlBalances`] on an SQLite file,
/// [`PgBalances`] on PostgreSQL (`--schema`). `rebuild bank_balances` fills
/// `bank_balances__next` beside the live table, which keeps serving (a live runner keeps
/// running), then switches in one transaction (`promote`); `reset` clears the live table. The
/// `bank-admin` binary runs it.
pub fn admin() -> cqrs_admin::Admin {
    use cqrs_admin::{Admin, Connection, ProjectionSetup};
    use cqrs_core::StoreError;
    fn backend(error: sqlx::Error) -> StoreError {
        StoreError::Backend(Box::new(error))
    }
    const TABLES: &[(&str, &str)] = &[(SqlBalances::TABLE, SqlBalances::BUILDING)];
    Admin::new()
        .aggregate::<Account>()
        .projection(|connection| match connection {
            Connection::Sqlite(store) => {
                let projections = cqrs_sqlite::SqliteProjections::new(store.clone());
                let (cleared, prepared) = (store.clone(), store.clone());
                let switching = projections.clone();
                let setup = ProjectionSetup::new(projections, SqlBalances::live)
                    .with_reset(move || {
                        let store = cleared.clone();
                        async move { SqlBalances::clear(&store).await.map_err(backend) }
                    })
                    .with_blue_green(
                        SqlBalances::building,
                        move || {
                            let store = prepared.clone();
                            async move { SqlBalances::prepare(&store).await.map_err(backend) }
                        },
                        move |name, built| {
                            let projections = switching.clone();
                            async move { projections.promote(&name, &built, TABLES).await.map(drop) }
                        },
                    );
                Some(setup)
            }
            _ => None,
        })
        .projection(|connection| match connection {
            Connection::Postgres(store) => {
                let projections = cqrs_postgres::PostgresProjections::new(store.clone());
                let (live, building) = (PgBalances::live(store), PgBalances::building(store));
                let (cleared, prepared) = (store.clone(), store.clone());
                let switching = projections.clone();
                let setup = ProjectionSetup::new(projections, move || live.clone())
                    .with_reset({
                        let live = PgBalances::live(store);
                        move || {
                            let (store, live) = (cleared.clone(), live.clone());
                            async move { live.prepare(&store).await.map_err(backend) }
                        }
                    })
                    .with_blue_green(
                        move || building.clone(),
                        {
                            let building = PgBalances::building(store);
                            move || {
                                let (store, building) = (prepared.clone(), building.clone());
                                async move { building.prepare(&store).await.map_err(backend) }
                            }
                        },
                        move |name, built| {
                            let projections = switching.clone();
                            async move { projections.promote(&name, &built, TABLES).await.map(drop) }
                        },
                    );
                Some(setup)
            }
            _ => None,
        })
}

/// Where the bank demo keeps its balances read model.
#[derive(Debug, Clone)]
pub enum ReadModel {
    /// [`Balances`] in this process's memory, rebuilt from the log on every start.
    InMemory,
    /// [`SqlBalances`] in the store's SQLite file, resumed from its checkpoint on every start.
    Sqlite(cqrs_sqlite::SqliteStore),
}

/// A teller that looks every withdrawal over asynchronously before it is decided. For the demo it
/// holds the first two withdrawals until both have loaded the account, so they race for real: both
/// decide against the same version, one append wins, the other conflicts and is retried.
#[derive(Debug, Default)]
pub struct Teller {
    arrived: std::sync::atomic::AtomicUsize,
    both_loaded: tokio::sync::Notify,
}

impl HandleWith<Withdraw, Teller> for Account {
    type Error = BankError;

    async fn handle_with(
        &self,
        command: &Withdraw,
        teller: &Teller,
    ) -> Result<Vec<AccountEvent>, BankError> {
        use std::sync::atomic::Ordering;
        let waiting = teller.both_loaded.notified();
        match teller.arrived.fetch_add(1, Ordering::SeqCst) {
            0 => waiting.await,
            1 => teller.both_loaded.notify_waiters(),
            _ => {}
        }
        self.handle(command)
    }
}

/// What the demo did, for printing and for tests.
#[derive(Debug, Clone, PartialEq)]
pub struct BankReport {
    /// The account used.
    pub account: String,
    /// Balance after everything.
    pub balance: i64,
    /// The rejected over-withdrawal.
    pub rejected: BankError,
    /// Attempts each of the two racing withdrawals needed.
    pub race_attempts: Vec<u32>,
    /// Balance as of stream version 3.
    pub balance_at_version_3: i64,
    /// Balance at the instant right after the first deposit was recorded.
    pub balance_after_first_deposit: i64,
    /// The balance the projection shows once it has caught up with the last command.
    pub projected_balance: i64,
    /// Stream version of the latest snapshot.
    pub snapshot_version: Option<u64>,
}

/// Runs the bank story on `store` with the in-memory read model, printing what happens to `out`.
pub async fn demo<S>(
    store: S,
    account: &str,
    out: &mut impl std::io::Write,
) -> Result<BankReport, Box<dyn std::error::Error + Send + Sync>>
where
    S: EventStore + SnapshotStore + Clone,
{
    demo_with(store, ReadModel::InMemory, account, out).await
}

/// Runs the bank story on `store`, keeping the balances read model where `read_model` says.
pub async fn demo_with<S>(
    store: S,
    read_model: ReadModel,
    account: &str,
    out: &mut impl std::io::Write,
) -> Result<BankReport, Box<dyn std::error::Error + Send + Sync>>
where
    S: EventStore + SnapshotStore + Clone,
{
    use std::sync::Arc;
    use std::time::Duration;

    use cqrs_core::subscription::{InProcess, ProjectionRunner};

    let accounts = Repository::<Account>::snapshotting(store.clone(), SnapshotPolicy::every(5))
        .with_retry(RetryPolicy::retries(3));
    enum Running {
        InMemory(cqrs_core::subscription::ProjectionHandle<Balances>),
        Sqlite(
            cqrs_core::subscription::ProjectionHandle<SqlBalances>,
            cqrs_sqlite::SqliteStore,
        ),
    }
    let balances = match read_model {
        ReadModel::InMemory => {
            let projections = Arc::new(InProcess::new(store.clone()));
            Running::InMemory(ProjectionRunner::shared(Balances::default(), projections).spawn())
        }
        ReadModel::Sqlite(sqlite) => {
            SqlBalances::create(&sqlite).await?;
            let projections = cqrs_sqlite::SqliteProjections::new(sqlite.clone());
            Running::Sqlite(
                ProjectionRunner::new(SqlBalances::live(), projections).spawn(),
                sqlite,
            )
        }
    };

    let open = OpenAccount {
        owner: "Ada".to_owned(),
    };
    accounts.execute(account, &open).await?;
    writeln!(out, "opened {account}")?;
    for i in 1..=6 {
        let deposit = Deposit {
            amount: 100,
            memo: format!("salary part {i}"),
        };
        let outcome = accounts.execute(account, &deposit).await?;
        writeln!(out, "deposited 100 -> version {}", outcome.stream_version)?;
    }
    let stream = StreamId::new(Account::TYPE, account);
    let first_deposit = store.read_stream(&stream, StreamVersion::new(2), 1).await?;
    let first_deposit_at = first_deposit
        .first()
        .map(|e| e.recorded_at)
        .ok_or("first deposit missing")?;

    let rejected = match accounts
        .execute(account, &Withdraw { amount: 10_000 })
        .await
    {
        Err(cqrs_core::ExecuteError::Domain(error)) => error,
        other => return Err(format!("expected InsufficientFunds, got {other:?}").into()),
    };
    writeln!(out, "withdraw 10000 rejected: {rejected}")?;

    let teller = Arc::new(Teller::default());
    let race = |amount| {
        let accounts = accounts.clone();
        let teller = Arc::clone(&teller);
        let account = account.to_owned();
        tokio::spawn(async move {
            let command = Withdraw { amount };
            accounts.execute_with(&account, &command, &*teller).await
        })
    };
    let (a, b) = (race(200), race(150));
    let mut race_attempts = vec![a.await??.attempts, b.await??.attempts];
    race_attempts.sort_unstable();
    writeln!(
        out,
        "two concurrent withdrawals took {race_attempts:?} attempts (one conflict, retried)"
    )?;

    let last = accounts
        .execute(
            account,
            &Deposit {
                amount: 1,
                memo: "interest".into(),
            },
        )
        .await?;
    let now = accounts.load(account).await?;
    let at_3 = accounts
        .load_at_version(account, StreamVersion::new(3))
        .await?;
    let after_first = accounts.load_as_of(account, first_deposit_at).await?;
    writeln!(
        out,
        "balance now {} (version {}); at version 3 it was {}",
        now.state.balance, now.version, at_3.state.balance
    )?;

    let position = last.position.ok_or("the deposit wrote no event")?;
    let projected_balance = match balances {
        Running::InMemory(balances) => {
            balances.wait_for(position, Duration::from_secs(10)).await?;
            let projected = balances.stop().await.ok_or("projection runner ended")?;
            projected.balances.get(account).copied().unwrap_or_default()
        }
        Running::Sqlite(balances, sqlite) => {
            balances.wait_for(position, Duration::from_secs(10)).await?;
            balances.stop().await;
            let accounts = SqlBalances::accounts(&sqlite).await?;
            writeln!(
                out,
                "the bank_balances table holds {accounts} account(s), this run's and earlier runs'"
            )?;
            SqlBalances::balance(&sqlite, account)
                .await?
                .unwrap_or_default()
        }
    };
    writeln!(out, "balance projection shows {projected_balance}")?;
    let snapshot = store.load_snapshot(&stream).await?;

    Ok(BankReport {
        account: account.to_owned(),
        balance: now.state.balance,
        rejected,
        race_attempts,
        balance_at_version_3: at_3.state.balance,
        balance_after_first_deposit: after_first.state.balance,
        projected_balance,
        snapshot_version: snapshot.map(|s| s.stream_version.get()),
    })
}
