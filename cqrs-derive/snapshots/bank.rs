// Input of the expansion snapshot (see `src/snapshot.rs`): a small bank domain using each macro
// and each of its main options once. `bank.expanded.rs` beside it is the reviewed output.

#[event(name = "AccountOpened")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccountOpened {
    pub owner: String,
}

#[event(name = "MoneyDeposited", version = 1)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoneyDepositedV1 {
    pub amount: i64,
}

#[event(name = "MoneyDeposited", version = 2, upcast_from = MoneyDepositedV1)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoneyDeposited {
    pub amount: i64,
    pub memo: String,
}

#[event(name = "MoneyWithdrawn", version = 2, upcast_json = upcast_withdrawn)]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoneyWithdrawn {
    pub amount: i64,
}

#[derive(Debug, Default, Aggregate)]
#[aggregate(name = "account", events(AccountOpened, MoneyDeposited, MoneyWithdrawn), snapshot_version = 2)]
pub struct Account {
    pub open: bool,
    pub balance: i64,
}

#[derive(Default)]
pub struct Balances {
    pub by_account: BTreeMap<String, i64>,
}

#[projection(name = "balances")]
impl Balances {
    fn opened(&mut self, _: &AccountOpened, meta: &RecordedEvent) {
        self.by_account.insert(meta.stream_id.to_string(), 0);
    }

    async fn deposited(&mut self, event: &MoneyDeposited, meta: &RecordedEvent) {
        *self.by_account.entry(meta.stream_id.to_string()).or_default() += event.amount;
    }

    fn withdrawn(&mut self, event: &MoneyWithdrawn, meta: &RecordedEvent) -> Result<(), Overdrawn> {
        let balance = self.by_account.entry(meta.stream_id.to_string()).or_default();
        *balance -= event.amount;
        if *balance < 0 { Err(Overdrawn) } else { Ok(()) }
    }

    #[helper]
    pub fn total(&self) -> i64 {
        self.by_account.values().sum()
    }
}

/// Writes one row per deposit, in one statement per batch.
#[derive(Default)]
pub struct Ledger {
    pending: Vec<(String, i64)>,
}

#[projection(name = "ledger")]
impl Ledger {
    fn deposited(&mut self, event: &MoneyDeposited, meta: &RecordedEvent, _: &mut Db) {
        self.pending.push((meta.stream.id().to_owned(), event.amount));
    }

    #[flush]
    async fn write(&mut self, db: &mut Db) -> Result<(), DbError> {
        db.insert_all(std::mem::take(&mut self.pending)).await
    }

    #[discard]
    fn forget(&mut self) {
        self.pending.clear();
    }
}
