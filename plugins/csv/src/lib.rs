//! CSV text to JSON records: one object per row, keyed by the header row.
//! The text is the step's input (a string), or an asset the config names.

use qflow_sdk::serde::Deserialize;
use qflow_sdk::serde_json::{Map, Number, Value};
use qflow_sdk::{Error, Step, asset, export_step};

#[derive(Deserialize)]
#[serde(crate = "qflow_sdk::serde", default, deny_unknown_fields)]
struct Config {
    /// The field separator, one ASCII character.
    delimiter: char,
    /// Turn fields that look like numbers or booleans into JSON numbers and
    /// booleans; off by default, so every field is a string.
    infer_types: bool,
    /// Read the CSV from this asset (`loader-id/name`) instead of the input.
    asset: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config { delimiter: ',', infer_types: false, asset: None }
    }
}

struct Csv {
    delimiter: u8,
    infer_types: bool,
    /// The asset's text, read once in `new`.
    text: Option<String>,
}

impl Step for Csv {
    type Config = Config;
    type Input = Value;
    type Output = Vec<Map<String, Value>>;

    fn new(config: Config) -> Result<Self, Error> {
        let delimiter = u8::try_from(config.delimiter)
            .ok()
            .filter(u8::is_ascii)
            .ok_or_else(|| Error::bad_config("`delimiter` must be one ASCII character"))?;
        let text = match &config.asset {
            Some(name) => Some(
                String::from_utf8(asset(name)?)
                    .map_err(|_| Error::bad_config(format!("asset {name} is not UTF-8 text")))?,
            ),
            None => None,
        };
        Ok(Csv { delimiter, infer_types: config.infer_types, text })
    }

    fn run(&mut self, input: Value) -> Result<Self::Output, Error> {
        let text = match (&self.text, &input) {
            (Some(text), _) => text.as_str(),
            (None, Value::String(text)) => text.as_str(),
            (None, _) => return Err(Error::bad_input("expected CSV text (a string)")),
        };
        let mut reader =
            csv::ReaderBuilder::new().delimiter(self.delimiter).from_reader(text.as_bytes());
        let headers = reader.headers().map_err(Error::bad_input)?.clone();
        let mut records = Vec::new();
        for row in reader.records() {
            let row = row.map_err(Error::bad_input)?;
            let record = headers
                .iter()
                .zip(row.iter())
                .map(|(key, field)| (key.to_owned(), self.value(field)))
                .collect();
            records.push(record);
        }
        Ok(records)
    }
}

impl Csv {
    fn value(&self, field: &str) -> Value {
        if self.infer_types {
            if let Ok(n) = field.parse::<i64>() {
                return Value::Number(n.into());
            }
            if let Some(n) = field.parse::<f64>().ok().and_then(Number::from_f64) {
                return Value::Number(n);
            }
            if let Ok(b) = field.parse::<bool>() {
                return Value::Bool(b);
            }
        }
        Value::String(field.to_owned())
    }
}

export_step!(Csv, "Parses CSV text into JSON records");
