//! `cargo run -p examples --bin bank-admin -- <command>`: the `cqrs-admin` command line with the
//! bank's aggregate and read model registered (see `examples::bank::admin`), so that besides
//! inspecting streams it shows an account's state (`show account <id> --state --at-version 3`)
//! and rebuilds, resets or skips for the `bank_balances` table of the SQLite file
//! (`--url sqlite:<file>`, or `DATABASE_URL`). On PostgreSQL the bank keeps its balances in
//! memory, so only the inspecting commands apply there.

fn main() -> std::process::ExitCode {
    examples::bank::admin().run(std::env::args_os())
}
