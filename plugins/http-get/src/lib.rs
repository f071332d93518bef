//! Fetches a URL through the host's HTTP (the step needs an `http` grant
//! for it). The URL is the config's `url`, or the input's `url` when the
//! input has one. The output is the body as JSON when the response says
//! it is JSON, else as text, with the status:
//! `{"status": 200, "body": …}`. A status of 400 or more fails the step
//! (retryably for 5xx and 429) unless `fail_on_status = false`.

use qflow_sdk::serde_json::{Value, json};
use qflow_sdk::{Error, Step, export_step, http};
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(crate = "qflow_sdk::serde", deny_unknown_fields)]
struct Config {
    #[serde(default)]
    url: Option<String>,
    #[serde(default = "yes")]
    fail_on_status: bool,
    /// How long to wait for the response's headers (ms); the host's limit
    /// applies too.
    #[serde(default)]
    timeout_ms: Option<u64>,
}

fn yes() -> bool {
    true
}

struct HttpGet {
    config: Config,
}

impl Step for HttpGet {
    type Config = Config;
    type Input = Value;
    type Output = Value;

    fn new(config: Config) -> Result<Self, Error> {
        Ok(HttpGet { config })
    }

    fn run(&mut self, input: Value) -> Result<Value, Error> {
        let url = match input.get("url").and_then(Value::as_str) {
            Some(url) => url.to_owned(),
            None => self
                .config
                .url
                .clone()
                .ok_or_else(|| Error::bad_config("no `url` in the config or the input"))?,
        };
        let timeout = self.config.timeout_ms.map(std::time::Duration::from_millis);
        let response = http::request_within("GET", &url, &[], None, timeout)?;
        if self.config.fail_on_status && response.status >= 400 {
            let error = Error::new("http-status", format!("GET {url}: status {}", response.status));
            let retry = response.status >= 500 || response.status == 429;
            return Err(if retry { error.retryable() } else { error });
        }
        let is_json = response.header("content-type").is_some_and(|t| t.contains("json"));
        let body = if is_json {
            response.json::<Value>()?
        } else {
            Value::String(response.text()?.to_owned())
        };
        Ok(json!({"status": response.status, "body": body}))
    }
}

export_step!(HttpGet, "Fetches a URL (JSON or text) through the host's granted, pooled HTTP");
