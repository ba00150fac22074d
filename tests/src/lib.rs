//! Integration tests live in `tests/tests/`; the compile-fail suite in `tests/ui/`.
