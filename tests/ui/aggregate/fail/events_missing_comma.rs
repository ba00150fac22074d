// A missing comma in `events(...)`: one error, and the handlers' `.into()` calls still compile.
include!("../../bank/events.rs");

#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "account", events(AccountOpened, MoneyDeposited MoneyWithdrawn, AccountClosed))]
pub struct Account {
    open: bool,
    balance: i64,
}

include!("../../bank/handlers.rs");

fn main() {}
