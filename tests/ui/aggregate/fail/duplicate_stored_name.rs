// Two listed events stored under one name (a copy-pasted `name`): one error underlining both, with both fixes.
include!("../../bank/events.rs");

#[event(name = "MoneyDeposited")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeeCharged {
    pub amount: i64,
}

#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "account", events(AccountOpened, MoneyDeposited, MoneyWithdrawn, AccountClosed, FeeCharged))]
pub struct Account {
    open: bool,
    balance: i64,
}

include!("../../bank/handlers.rs");

impl Apply<FeeCharged> for Account {
    fn apply(&mut self, event: &FeeCharged) {
        self.balance -= event.amount;
    }
}

pub struct ChargeFee {
    pub amount: i64,
}

impl Handle<ChargeFee> for Account {
    type Error = AccountError;
    fn handle(&self, command: &ChargeFee) -> Result<Vec<AccountEvent>, AccountError> {
        Ok(vec![FeeCharged { amount: command.amount }.into()])
    }
}

fn main() {}
