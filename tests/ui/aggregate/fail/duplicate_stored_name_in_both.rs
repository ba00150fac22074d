// Two events stored under one name, listed by an aggregate and handled by a projection: one error
// per macro (each sees only its own list), each underlining both events.
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

#[derive(Default)]
pub struct Fees {
    total: i64,
}

#[projection(name = "fees")]
impl Fees {
    fn deposited(&mut self, _: &MoneyDeposited) {}

    fn charged(&mut self, event: &FeeCharged) {
        self.total += event.amount;
    }
}

fn main() {}
