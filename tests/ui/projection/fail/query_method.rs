// A query and a constructor left in a `#[projection]` block: mark them `#[helper]` or move them.
include!("../../bank/events.rs");
include!("../../bank/account.rs");

#[derive(Default)]
pub struct Balances {
    by_account: std::collections::BTreeMap<String, i64>,
}

#[projection(name = "balances")]
impl Balances {
    fn opened(&mut self, _: &AccountOpened, meta: &RecordedEvent) {
        self.by_account.insert(meta.stream.to_string(), 0);
    }

    fn deposited(&mut self, event: &MoneyDeposited, meta: &RecordedEvent) {
        *self.by_account.entry(meta.stream.to_string()).or_default() += event.amount;
    }

    pub fn new() -> Self {
        Self::default()
    }

    pub fn balance(&self, account: &str) -> i64 {
        self.by_account.get(account).copied().unwrap_or_default()
    }
}

fn main() {}
