//! Runs a jq filter (jaq: jq's language with its standard library) over the
//! step's input. The filter is compiled once per instance. A filter that
//! yields one value returns it; one that yields none or several returns them
//! as an array.

use jaq_core::load::{Arena, File, Loader};
use jaq_core::{Compiler, Ctx, Vars, data, unwrap_valr};
use jaq_json::Val;
use qflow_sdk::serde::Deserialize;
use qflow_sdk::serde_json::{self, Value};
use qflow_sdk::{Error, Step, export_step};

#[derive(Deserialize)]
#[serde(crate = "qflow_sdk::serde", deny_unknown_fields)]
struct Config {
    /// The jq filter, such as `map(.amount | tonumber) | add`.
    filter: String,
}

type Filter = jaq_core::Filter<data::JustLut<Val>>;

struct Jq {
    filter: Filter,
}

impl Step for Jq {
    type Config = Config;
    type Input = Value;
    type Output = Value;

    fn new(config: Config) -> Result<Self, Error> {
        let defs = jaq_core::defs().chain(jaq_std::defs()).chain(jaq_json::defs());
        let funs = jaq_core::funs().chain(jaq_std::funs()).chain(jaq_json::funs());
        let arena = Arena::default();
        let program = File { code: config.filter.as_str(), path: () };
        let modules = Loader::new(defs)
            .load(&arena, program)
            .map_err(|errs| Error::bad_config(format!("the filter does not parse: {errs:?}")))?;
        let filter = Compiler::default()
            .with_funs(funs)
            .compile(modules)
            .map_err(|errs| Error::bad_config(format!("the filter does not compile: {errs:?}")))?;
        Ok(Jq { filter })
    }

    fn run(&mut self, input: Value) -> Result<Value, Error> {
        let text = serde_json::to_string(&input).map_err(Error::bad_input)?;
        let input = jaq_json::read::parse_single(text.as_bytes()).map_err(Error::bad_input)?;
        let ctx = Ctx::<data::JustLut<Val>>::new(&self.filter.lut, Vars::new([]));
        let mut outputs = Vec::new();
        for out in self.filter.id.run((ctx, input)).map(unwrap_valr) {
            let out = out.map_err(|e| Error::new("filter-error", e))?;
            let out = serde_json::from_str(&out.to_string()).map_err(|e| {
                Error::new("filter-error", format!("the filter made a value JSON cannot hold: {e}"))
            })?;
            outputs.push(out);
        }
        Ok(match outputs.len() {
            1 => outputs.pop().unwrap_or_default(),
            _ => Value::Array(outputs),
        })
    }
}

export_step!(Jq, "Runs a jq filter over its input");
