//! Computes fib(n) by naive recursion: a deliberately CPU-bound step.

use qflow_sdk::serde::{Deserialize, Serialize};
use qflow_sdk::{Error, Step, export_step};

#[derive(Deserialize, Default)]
#[serde(crate = "qflow_sdk::serde", deny_unknown_fields)]
struct Config {
    /// Which number to compute; when absent, the input says.
    n: Option<u32>,
}

/// The input: `n` itself, or an object with a field `n`.
#[derive(Deserialize)]
#[serde(crate = "qflow_sdk::serde", untagged)]
enum Input {
    N(u32),
    Object { n: u32 },
    Other(qflow_sdk::serde::de::IgnoredAny),
}

#[derive(Serialize)]
#[serde(crate = "qflow_sdk::serde")]
struct Output {
    n: u32,
    fib: u64,
}

/// fib(93) is the largest that fits in a u64.
const MAX_N: u32 = 93;

struct Fib {
    n: Option<u32>,
}

impl Step for Fib {
    type Config = Option<Config>;
    type Input = Input;
    type Output = Output;

    fn new(config: Option<Config>) -> Result<Self, Error> {
        let n = config.unwrap_or_default().n;
        if let Some(n) = n.filter(|&n| n > MAX_N) {
            return Err(Error::bad_config(format!(
                "n = {n} is over {MAX_N}: fib(n) would overflow"
            )));
        }
        Ok(Fib { n })
    }

    fn run(&mut self, input: Input) -> Result<Output, Error> {
        let n = match (self.n, input) {
            (Some(n), _) | (None, Input::N(n) | Input::Object { n }) => n,
            (None, Input::Other(_)) => {
                return Err(Error::bad_input("expected n, or an object with a field `n`"));
            }
        };
        if n > MAX_N {
            return Err(Error::bad_input(format!(
                "n = {n} is over {MAX_N}: fib(n) would overflow"
            )));
        }
        Ok(Output { n, fib: fib(n) })
    }
}

fn fib(n: u32) -> u64 {
    if n < 2 { n as u64 } else { fib(n - 1) + fib(n - 2) }
}

export_step!(Fib, "Computes fib(n) by naive recursion (CPU-bound)");
