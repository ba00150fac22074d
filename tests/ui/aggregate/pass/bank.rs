// The shared bank domain (`ui/bank/`) compiles without errors or warnings, so every message in a
// fail case's `.stderr` is the case's own.
include!("../../bank/events.rs");
include!("../../bank/account.rs");
include!("../../bank/balances.rs");

fn main() {}
