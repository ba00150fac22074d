// A missing comma in `events(...)`: one error, and the handlers' `.into()` calls still compile.
use std::collections::BTreeMap;

use cqrs_core::prelude::*;
use serde::{Deserialize, Serialize};

#[event(name = "AccountOpened")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountOpened {
    pub owner: String,
}

#[event(name = "MoneyDeposited")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoneyDeposited {
    pub amount: i64,
}

#[event(name = "MoneyWithdrawn")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoneyWithdrawn {
    pub amount: i64,
}

#[event(name = "AccountClosed")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountClosed {}

#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "account", events(AccountOpened, MoneyDeposited MoneyWithdrawn, AccountClosed))]
pub struct Account {
    open: bool,
    balance: i64,
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
impl Apply<AccountClosed> for Account {
    fn apply(&mut self, _: &AccountClosed) {
        self.open = false;
    }
}

pub struct OpenAccount {
    pub owner: String,
}
pub struct Deposit {
    pub amount: i64,
}
pub struct Withdraw {
    pub amount: i64,
}
pub struct CloseAccount;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("the account is closed")]
    Closed,
    #[error("insufficient funds")]
    InsufficientFunds,
}

impl Handle<OpenAccount> for Account {
    type Error = AccountError;
    fn handle(&self, command: &OpenAccount) -> Result<Vec<AccountEvent>, AccountError> {
        Ok(vec![AccountOpened { owner: command.owner.clone() }.into()])
    }
}
impl Handle<Deposit> for Account {
    type Error = AccountError;
    fn handle(&self, command: &Deposit) -> Result<Vec<AccountEvent>, AccountError> {
        if !self.open {
            return Err(AccountError::Closed);
        }
        Ok(vec![MoneyDeposited { amount: command.amount }.into()])
    }
}
impl Handle<Withdraw> for Account {
    type Error = AccountError;
    fn handle(&self, command: &Withdraw) -> Result<Vec<AccountEvent>, AccountError> {
        if self.balance < command.amount {
            return Err(AccountError::InsufficientFunds);
        }
        Ok(vec![MoneyWithdrawn { amount: command.amount }.into()])
    }
}
impl Handle<CloseAccount> for Account {
    type Error = AccountError;
    fn handle(&self, _: &CloseAccount) -> Result<Vec<AccountEvent>, AccountError> {
        Ok(vec![AccountClosed {}.into()])
    }
}

#[derive(Default)]
pub struct Balances {
    by_account: BTreeMap<String, i64>,
}

#[projection(name = "balances")]
impl Balances {
    fn opened(&mut self, _: &AccountOpened, meta: &RecordedEvent) {
        self.by_account.insert(meta.stream.to_string(), 0);
    }

    fn deposited(&mut self, event: &MoneyDeposited, meta: &RecordedEvent) {
        *self.by_account.entry(meta.stream.to_string()).or_default() += event.amount;
    }

    fn withdrawn(&mut self, event: &MoneyWithdrawn, meta: &RecordedEvent) {
        *self.by_account.entry(meta.stream.to_string()).or_default() -= event.amount;
    }

    #[helper]
    pub fn balance(&self, account: &str) -> i64 {
        self.by_account.get(account).copied().unwrap_or_default()
    }
}

fn main() {}
