//! Example domains shared by the example binaries and their tests.
//!
//! Each binary runs in memory by default and on PostgreSQL when `DATABASE_URL` is set.

pub mod bank;
pub mod catalogue;
pub mod http;
pub mod orders;
