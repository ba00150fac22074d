// A handler for a type that is not an `#[event]`: one error, at the type, saying to add `#[event]`.
include!("../../bank/events.rs");
include!("../../bank/account.rs");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InterestPaid {
    pub amount: i64,
}

#[derive(Default)]
pub struct Balances {
    by_account: std::collections::BTreeMap<String, i64>,
}

#[projection(name = "balances")]
impl Balances {
    fn deposited(&mut self, event: &MoneyDeposited, meta: &RecordedEvent) {
        *self.by_account.entry(meta.stream.to_string()).or_default() += event.amount;
    }

    fn interest(&mut self, event: &InterestPaid, meta: &RecordedEvent) {
        *self.by_account.entry(meta.stream.to_string()).or_default() += event.amount;
    }
}

fn main() {}
