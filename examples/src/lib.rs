//! Example domains shared by the example binaries and their tests.
