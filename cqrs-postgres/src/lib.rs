//! PostgreSQL backend for `cqrs-core`.
#![forbid(unsafe_code)]
