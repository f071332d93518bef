//! Renders a minijinja (Jinja2) template with the step's input as its context.
//! The template is given inline (`template`) or as an asset (`template_asset`),
//! and is parsed once per instance.

use qflow_sdk::serde::Deserialize;
use qflow_sdk::serde_json::Value;
use qflow_sdk::{Error, Step, asset, export_step};

#[derive(Deserialize)]
#[serde(crate = "qflow_sdk::serde", deny_unknown_fields)]
struct Config {
    /// The template's text.
    template: Option<String>,
    /// An asset (`loader-id/name`) holding the template's text.
    template_asset: Option<String>,
}

struct Template {
    env: minijinja::Environment<'static>,
}

const NAME: &str = "template";

impl Step for Template {
    type Config = Config;
    type Input = Value;
    type Output = String;

    fn new(config: Config) -> Result<Self, Error> {
        let source = match (config.template, config.template_asset) {
            (Some(text), None) => text,
            (None, Some(name)) => String::from_utf8(asset(&name)?)
                .map_err(|_| Error::bad_config(format!("asset {name} is not UTF-8 text")))?,
            _ => {
                return Err(Error::bad_config(
                    "give exactly one of `template` and `template_asset`",
                ));
            }
        };
        let mut env = minijinja::Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.add_template_owned(NAME, source).map_err(|e| Error::bad_config(describe(&e)))?;
        Ok(Template { env })
    }

    fn run(&mut self, input: Value) -> Result<String, Error> {
        let template = self.env.get_template(NAME).map_err(|e| Error::bad_config(describe(&e)))?;
        template.render(input).map_err(|e| Error::bad_input(describe(&e)))
    }
}

/// minijinja's message plus the line it points at.
fn describe(e: &minijinja::Error) -> String {
    match e.line() {
        Some(line) => format!("{e} (template line {line})"),
        None => e.to_string(),
    }
}

export_step!(Template, "Renders a minijinja template with its input as the context");
