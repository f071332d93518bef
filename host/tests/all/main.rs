//! End-to-end tests: the bundled plugins, built for real, run through the
//! library and through the `qflow` binary.

mod cli;
mod failures;
mod flows;
mod support;
