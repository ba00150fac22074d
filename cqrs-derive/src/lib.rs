//! Derive macros for `cqrs-core`. Use them through `cqrs_core` (which re-exports them).
#![forbid(unsafe_code)]
