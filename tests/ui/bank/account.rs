// A correct `Account` aggregate over `events.rs`. Shared by the trybuild cases: see README.md.

#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "account", events(AccountOpened, MoneyDeposited, MoneyWithdrawn, AccountClosed))]
pub struct Account {
    open: bool,
    balance: i64,
}

include!("handlers.rs");
