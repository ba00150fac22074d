// Malformed `#[aggregate(...)]` arguments: one error each, and no other. Every entry that names a
// type keeps its variant, so the handlers' `.into()` calls (in `bank/handlers.rs`) still compile.

// A value that does not parse, before `events`: the list after it still counts.
mod name_not_a_string {
    include!("../../bank/events.rs");

    #[derive(Debug, Default, Aggregate)]
    #[aggregate(name = account, events(AccountOpened, MoneyDeposited, MoneyWithdrawn, AccountClosed))]
    pub struct Account {
        open: bool,
        balance: i64,
    }

    include!("../../bank/handlers.rs");
}

// A missing comma between two keys.
mod comma_between_keys {
    include!("../../bank/events.rs");

    #[derive(Debug, Default, Aggregate)]
    #[aggregate(name = "account" events(AccountOpened, MoneyDeposited, MoneyWithdrawn, AccountClosed))]
    pub struct Account {
        open: bool,
        balance: i64,
    }

    include!("../../bank/handlers.rs");
}

// A separator that is not a comma.
mod semicolon {
    include!("../../bank/events.rs");

    #[derive(Debug, Default, Aggregate)]
    #[aggregate(name = "account", events(AccountOpened, MoneyDeposited; MoneyWithdrawn, AccountClosed))]
    pub struct Account {
        open: bool,
        balance: i64,
    }

    include!("../../bank/handlers.rs");
}

// The list written as a value.
mod list_with_eq {
    include!("../../bank/events.rs");

    #[derive(Debug, Default, Aggregate)]
    #[aggregate(name = "account", events = [AccountOpened, MoneyDeposited, MoneyWithdrawn, AccountClosed])]
    pub struct Account {
        open: bool,
        balance: i64,
    }

    include!("../../bank/handlers.rs");
}

// A type written as a string.
mod strings {
    include!("../../bank/events.rs");

    #[derive(Debug, Default, Aggregate)]
    #[aggregate(name = "account", events("AccountOpened", MoneyDeposited, MoneyWithdrawn, AccountClosed))]
    pub struct Account {
        open: bool,
        balance: i64,
    }

    include!("../../bank/handlers.rs");
}

fn main() {}
