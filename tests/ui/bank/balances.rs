// A correct read model over `events.rs`. Shared by the trybuild cases: see README.md.

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

    fn withdrawn(&mut self, event: &MoneyWithdrawn, meta: &RecordedEvent) {
        *self.by_account.entry(meta.stream.to_string()).or_default() -= event.amount;
    }

    #[helper]
    pub fn balance(&self, account: &str) -> i64 {
        self.by_account.get(account).copied().unwrap_or_default()
    }
}
