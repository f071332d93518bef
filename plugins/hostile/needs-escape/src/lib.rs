//! Declares a need that is a path out of the plugins directory: the host
//! must refuse it as it refuses such a name in a flow, and read nothing.

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

export_step!(
    Passthrough,
    "Declares a need outside the plugins directory",
    needs = ["../outside/evil"]
);
