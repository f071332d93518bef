//! End-to-end tests: the bundled plugins, built for real, run through the
//! library and through the `qflow` binary.

// A test that panics on a broken expectation is doing its job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod contract;
mod failures;
mod flows;
mod hardening;
mod http;
mod optimize;
mod pools;
mod reload;
mod runs;
mod sandbox;
mod scheduler;
mod sql;
mod store;
mod support;
