//! Returns its input unchanged: a pass-through, a join point for several
//! dependencies, and the trivial step Qflow's benchmarks measure overhead with.

use qflow_sdk::serde_json::Value;
use qflow_sdk::{Error, Step, export_step};

struct Identity;

impl Step for Identity {
    type Config = ();
    type Input = Value;
    type Output = Value;

    fn new(_config: ()) -> Result<Self, Error> {
        Ok(Identity)
    }

    fn run(&mut self, input: Value) -> Result<Value, Error> {
        Ok(input)
    }
}

export_step!(Identity, "Returns its input unchanged");
