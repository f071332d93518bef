//! Needs needs-cycle-a, which needs it back.

use qflow_sdk::serde_json::Value;
use qflow_sdk::{Error, Step, export_step};

struct Passthrough;

impl Step for Passthrough {
    type Config = ();
    type Input = Value;
    type Output = Value;

    fn new(_config: ()) -> Result<Self, Error> {
        Ok(Passthrough)
    }

    fn run(&mut self, input: Value) -> Result<Value, Error> {
        Ok(input)
    }
}

export_step!(Passthrough, "Needs needs-cycle-a, which needs it back", needs = ["needs-cycle-a"]);
