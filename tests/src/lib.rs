//! Integration tests live in `tests/tests/`; the compile-fail suite in `tests/ui/`. The README's
//! code is the doctest of `tests/readme`, whose dependencies the compile-fail suite does not build.
