// `Apply` and `Handle` impls for the `Account` (fields `open`, `balance`) a case defines. Shared
// by the trybuild cases: see README.md.

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
