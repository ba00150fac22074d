// Two unrelated handled events stored under one name: one error underlining both, with both fixes.
include!("../../bank/events.rs");
include!("../../bank/account.rs");

#[event(name = "AccountOpened")]
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CardIssued {
    pub card: String,
}

#[derive(Default)]
pub struct Activity {
    opened: u64,
    cards: u64,
}

#[projection(name = "activity")]
impl Activity {
    fn opened(&mut self, _: &AccountOpened) {
        self.opened += 1;
    }

    fn card_issued(&mut self, _: &CardIssued) {
        self.cards += 1;
    }
}

fn main() {}
