// A listed event that is not an `#[event]`: one error, at the type, saying to add `#[event]`.
include!("../../bank/events.rs");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountFrozen {
    pub reason: String,
}

#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "account", events(AccountOpened, MoneyDeposited, MoneyWithdrawn, AccountClosed, AccountFrozen))]
pub struct Account {
    open: bool,
    balance: i64,
}

include!("../../bank/handlers.rs");

impl Apply<AccountFrozen> for Account {
    fn apply(&mut self, _: &AccountFrozen) {
        self.open = false;
    }
}

pub struct Freeze {
    pub reason: String,
}

impl Handle<Freeze> for Account {
    type Error = AccountError;
    fn handle(&self, command: &Freeze) -> Result<Vec<AccountEvent>, AccountError> {
        Ok(vec![AccountFrozen { reason: command.reason.clone() }.into()])
    }
}

fn main() {}
