//! `cqrs-admin`: the command line with nothing registered (streams, events, status, horizon,
//! migrations). Rebuild, reset and skip need your projections: embed [`cqrs_admin::Admin`] in a
//! binary of your own.

fn main() -> std::process::ExitCode {
    cqrs_admin::Admin::new().run(std::env::args_os())
}
