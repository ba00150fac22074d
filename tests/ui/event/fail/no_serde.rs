// An event that does not derive `Serialize` and `Deserialize`: one error, at the struct.
include!("../../bank/events.rs");

#[event(name = "InterestPaid")]
#[derive(Debug, Clone, PartialEq)]
pub struct InterestPaid {
    pub amount: i64,
}

#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "account", events(AccountOpened, MoneyDeposited, MoneyWithdrawn, AccountClosed, InterestPaid))]
pub struct Account {
    open: bool,
    balance: i64,
}

include!("../../bank/handlers.rs");

impl Apply<InterestPaid> for Account {
    fn apply(&mut self, event: &InterestPaid) {
        self.balance += event.amount;
    }
}

pub struct PayInterest {
    pub amount: i64,
}

impl Handle<PayInterest> for Account {
    type Error = AccountError;
    fn handle(&self, command: &PayInterest) -> Result<Vec<AccountEvent>, AccountError> {
        Ok(vec![InterestPaid { amount: command.amount }.into()])
    }
}

#[derive(Default)]
pub struct Interest {
    total: i64,
}

#[projection(name = "interest")]
impl Interest {
    fn paid(&mut self, event: &InterestPaid) {
        self.total += event.amount;
    }
}

fn main() {}
