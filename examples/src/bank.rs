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
#[derive(Debug, Default, Clone)]
pub struct SqlBalances;

impl SqlBalances {
    /// Creates the table if needed.
    pub async fn create(store: &cqrs_sqlite::SqliteStore) -> Result<(), sqlx::Error> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS bank_balances \
             (account TEXT PRIMARY KEY, balance INTEGER NOT NULL, movements INTEGER NOT NULL)",
        )
        .execute(store.pool())
        .await?;
        Ok(())
    }

    /// Empties the table (creating it if needed), before a rebuild.
    pub async fn clear(store: &cqrs_sqlite::SqliteStore) -> Result<(), sqlx::Error> {
        Self::create(store).await?;
        sqlx::query("DELETE FROM bank_balances")
            .execute(store.pool())
            .await?;
        Ok(())
    }

    /// An account's balance as the table shows it.
    pub async fn balance(
        store: &cqrs_sqlite::SqliteStore,
        account: &str,
    ) -> Result<Option<i64>, sqlx::Error> {
        sqlx::query_scalar("SELECT balance FROM bank_balances WHERE account = ?1")
            .bind(account)
            .fetch_optional(store.pool())
            .await
    }

    /// How many accounts the table holds (this run's and earlier runs').
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
        sqlx::query(
            "INSERT INTO bank_balances (account, balance, movements) VALUES (?1, 0, 0) \
             ON CONFLICT (account) DO NOTHING",
        )
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
        Self::change(db, meta, event.amount).await
    }

    async fn on_withdrawn(
        &mut self,
        event: &MoneyWithdrawn,
        meta: &RecordedEvent,
        db: &mut sqlx::SqliteConnection,
    ) -> Result<(), sqlx::Error> {
        Self::change(db, meta, -event.amount).await
    }

    #[helper]
    async fn change(
        db: &mut sqlx::SqliteConnection,
        meta: &RecordedEvent,
        delta: i64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO bank_balances (account, balance, movements) VALUES (?1, ?2, 1) \
             ON CONFLICT (account) DO UPDATE SET balance = balance + excluded.balance, \
             movements = movements + 1",
        )
        .bind(meta.stream.id())
        .bind(delta)
        .execute(db)
        .await?;
        Ok(())
    }
}

/// The `cqrs-admin` command line with the bank registered: [`Account`] (for `show --state`) and,
/// on an SQLite file, [`SqlBalances`] with its table cleared before a rebuild. The `bank-admin`
/// binary runs it.
pub fn admin() -> cqrs_admin::Admin {
    use cqrs_admin::{Admin, Connection, ProjectionSetup};
    Admin::new()
        .aggregate::<Account>()
        .projection(|connection| match connection {
            Connection::Sqlite(store) => {
                let projections = cqrs_sqlite::SqliteProjections::new(store.clone());
                let store = store.clone();
                let setup =
                    ProjectionSetup::new(projections, || SqlBalances).with_reset(move || {
                        let store = store.clone();
                        async move {
                            SqlBalances::clear(&store)
                                .await
                                .map_err(|e| cqrs_core::StoreError::Backend(Box::new(e)))
                        }
                    });
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
                ProjectionRunner::new(SqlBalances, projections).spawn(),
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
