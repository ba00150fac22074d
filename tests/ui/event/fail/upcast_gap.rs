// An upcast chain with a gap: version 3 upcasts from the version-1 type, so stored version-2 rows
// could never be read. One error, at `upcast_from`.
include!("../../bank/events.rs");

#[event(name = "FeeCharged", version = 1)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeeChargedV1 {
    pub amount: i64,
}

#[event(name = "FeeCharged", version = 3, upcast_from = FeeChargedV1)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeeCharged {
    pub cents: i64,
    pub reason: String,
}

impl From<FeeChargedV1> for FeeCharged {
    fn from(v1: FeeChargedV1) -> Self {
        FeeCharged { cents: v1.amount * 100, reason: String::new() }
    }
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
        self.balance -= event.cents / 100;
    }
}

pub struct ChargeFee {
    pub cents: i64,
}

impl Handle<ChargeFee> for Account {
    type Error = AccountError;
    fn handle(&self, command: &ChargeFee) -> Result<Vec<AccountEvent>, AccountError> {
        Ok(vec![FeeCharged { cents: command.cents, reason: "monthly".into() }.into()])
    }
}

fn main() {}
