//! Waits `ms` milliseconds through the WASI monotonic clock, then returns its
//! input. The wait is the host's: a sleeping step holds no host thread.

use std::time::Duration;

use qflow_sdk::serde::Deserialize;
use qflow_sdk::serde_json::Value;
use qflow_sdk::{Error, Step, export_step};

#[derive(Deserialize, Default)]
#[serde(crate = "qflow_sdk::serde", deny_unknown_fields)]
struct Config {
    /// How long to wait; when absent, the input's `ms` field says.
    ms: Option<u64>,
}

struct Sleep {
    ms: Option<u64>,
}

impl Step for Sleep {
    type Config = Option<Config>;
    type Input = Value;
    type Output = Value;

    fn new(config: Option<Config>) -> Result<Self, Error> {
        Ok(Sleep { ms: config.unwrap_or_default().ms })
    }

    fn run(&mut self, input: Value) -> Result<Value, Error> {
        let ms = match self.ms {
            Some(ms) => ms,
            None => input.get("ms").and_then(Value::as_u64).ok_or_else(|| {
                Error::bad_input("say how long to wait: `ms` in the config or the input")
            })?,
        };
        std::thread::sleep(Duration::from_millis(ms));
        Ok(input)
    }
}

export_step!(Sleep, "Waits `ms` milliseconds, then returns its input");
