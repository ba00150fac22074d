// A misspelled event type: one error (rustc's, with the right name suggested), and the handlers'
// `.into()` calls add none.
include!("../../bank/events.rs");

#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "account", events(AccountOpened, MoneyDepostied, MoneyWithdrawn, AccountClosed))]
pub struct Account {
    open: bool,
    balance: i64,
}

include!("../../bank/handlers.rs");

fn main() {}
