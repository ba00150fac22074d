//! The README's code is compiled and run as this crate's doctest, so it stays true.

#[doc = include_str!("../../../README.md")]
pub mod readme {}
