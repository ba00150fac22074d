//! The benchmark domain: a bank account, written with this framework's macros. The raw baselines and
//! cqrs-es store the same JSON payloads (cqrs-es wraps them in its enum tag).

use cqrs_core::prelude::*;
use cqrs_core::{event, NewEvent};
use serde::{Deserialize, Serialize};

/// An account was opened.
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
    /// Statement text (~100 bytes in the workloads).
    pub memo: String,
}

/// Money was paid out.
#[event(name = "MoneyWithdrawn")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoneyWithdrawn {
    /// Amount in cents.
    pub amount: i64,
}

/// A bank account; `#[derive(Aggregate)]` generates `AccountEvent` and the apply dispatch.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize, cqrs_core::Aggregate)]
#[aggregate(
    name = "account",
    events(AccountOpened, MoneyDeposited, MoneyWithdrawn)
)]
pub struct Account {
    /// Whether it was opened.
    pub open: bool,
    /// Balance in cents.
    pub balance: i64,
    /// Number of deposits.
    pub deposits: u64,
}

impl Apply<AccountOpened> for Account {
    fn apply(&mut self, _: &AccountOpened) {
        self.open = true;
    }
}

impl Apply<MoneyDeposited> for Account {
    fn apply(&mut self, event: &MoneyDeposited) {
        self.balance += event.amount;
        self.deposits += 1;
    }
}

impl Apply<MoneyWithdrawn> for Account {
    fn apply(&mut self, event: &MoneyWithdrawn) {
        self.balance -= event.amount;
    }
}

/// Why a command is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BankError {
    /// Opened twice.
    #[error("account is already open")]
    AlreadyOpen,
    /// Not opened yet.
    #[error("account is not open")]
    NotOpen,
}

/// One workload command.
#[derive(Debug, Clone)]
pub enum Cmd {
    /// Open the account.
    Open {
        /// Owner name.
        owner: String,
    },
    /// Deposit money.
    Deposit {
        /// Amount in cents.
        amount: i64,
        /// ~100-byte memo.
        memo: String,
    },
}

impl Cmd {
    /// The event this command produces on a valid state (what the raw baselines insert).
    pub fn event(&self) -> AccountEvent {
        match self {
            Cmd::Open { owner } => AccountOpened {
                owner: owner.clone(),
            }
            .into(),
            Cmd::Deposit { amount, memo } => MoneyDeposited {
                amount: *amount,
                memo: memo.clone(),
            }
            .into(),
        }
    }

    /// Checks the command against the state, like the aggregate does.
    pub fn validate(&self, open: bool) -> Result<(), BankError> {
        match (self, open) {
            (Cmd::Open { .. }, true) => Err(BankError::AlreadyOpen),
            (Cmd::Deposit { .. }, false) => Err(BankError::NotOpen),
            _ => Ok(()),
        }
    }
}

impl Handle<Cmd> for Account {
    type Error = BankError;
    fn handle(&self, command: &Cmd) -> Result<Vec<AccountEvent>, BankError> {
        command.validate(self.open)?;
        Ok(vec![command.event()])
    }
}

/// A memo of exactly 100 bytes.
pub fn memo(account: usize, n: usize) -> String {
    let mut memo = format!("deposit {n} to account {account:05}: salary and reimbursements, ref ");
    while memo.len() < 100 {
        memo.push('x');
    }
    memo.truncate(100);
    memo
}

/// Account id `i`.
pub fn account_id(i: usize) -> String {
    format!("acc-{i:05}")
}

/// The commands of account `i` in W1: open, then 9 deposits.
pub fn w1_commands(i: usize) -> Vec<Cmd> {
    (0..10).map(|n| w1_command(i, n)).collect()
}

/// Command `n` (0-9) of account `i` in W1.
pub fn w1_command(i: usize, n: usize) -> Cmd {
    match n {
        0 => Cmd::Open {
            owner: format!("Owner {i}"),
        },
        n => Cmd::Deposit {
            amount: 100 + n as i64,
            memo: memo(i, n),
        },
    }
}

/// `n` encoded deposits (fresh ids), for seeding and batch appends.
pub fn deposits(account: usize, first: usize, n: usize) -> Vec<NewEvent> {
    (first..first + n)
        .map(|k| {
            let event: AccountEvent = MoneyDeposited {
                amount: 100,
                memo: memo(account, k),
            }
            .into();
            NewEvent::from_set(&event).unwrap_or_else(|e| panic!("encoding cannot fail: {e}"))
        })
        .collect()
}

/// The encoded `AccountOpened` event.
pub fn opened(account: usize) -> NewEvent {
    let event: AccountEvent = AccountOpened {
        owner: format!("Owner {account}"),
    }
    .into();
    NewEvent::from_set(&event).unwrap_or_else(|e| panic!("encoding cannot fail: {e}"))
}
