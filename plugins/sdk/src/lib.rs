//! Write Qflow plugins in Rust as plain functions over serde types.
//!
//! A step implements [`Step`] and is exported with [`export_step!`]; a loader
//! implements [`Loader`] and is exported with [`export_loader!`]. The SDK does
//! the WIT plumbing: it parses the step's configuration and input from JSON,
//! serialises its output, and turns errors into the contract's `step-error`.
//!
//! ```ignore
//! use qflow_sdk::{Error, Step, export_step};
//!
//! struct Shout;
//!
//! impl Step for Shout {
//!     type Config = ();
//!     type Input = String;
//!     type Output = String;
//!     fn new(_config: ()) -> Result<Self, Error> { Ok(Shout) }
//!     fn run(&mut self, input: String) -> Result<String, Error> {
//!         Ok(input.to_uppercase())
//!     }
//! }
//!
//! export_step!(Shout, "Upper-cases its input");
//! ```

use std::cell::RefCell;
use std::fmt;
use std::thread::LocalKey;

use serde::Serialize;
use serde::de::DeserializeOwned;

pub use serde;
pub use serde_json;

/// Bindings for the `step` world. Plugins use them through [`export_step!`].
#[doc(hidden)]
pub mod step_bindings {
    wit_bindgen::generate!({
        world: "step",
        path: "../../wit/0.2.0",
        pub_export_macro: true,
        export_macro_name: "export_step_world",
        default_bindings_module: "qflow_sdk::step_bindings",
    });
}

/// Bindings for the `loader` world. Plugins use them through [`export_loader!`].
#[doc(hidden)]
pub mod loader_bindings {
    wit_bindgen::generate!({
        world: "loader",
        path: "../../wit/0.2.0",
        pub_export_macro: true,
        export_macro_name: "export_loader_world",
        default_bindings_module: "qflow_sdk::loader_bindings",
        // One set of shared types and host imports for both worlds.
        with: {
            "qflow:plugin/types@0.2.0": crate::step_bindings::qflow::plugin::types,
            "qflow:plugin/host@0.2.0": crate::step_bindings::qflow::plugin::host,
        },
    });
}

use step_bindings::qflow::plugin::host;
use step_bindings::qflow::plugin::types::{LogLevel, StepError};

/// A step: configured once per instance by [`Step::new`], then run on inputs.
pub trait Step: Sized + 'static {
    /// The step's configuration, from the flow's `config` table.
    type Config: DeserializeOwned;
    /// What the step reads.
    type Input: DeserializeOwned;
    /// What the step returns.
    type Output: Serialize;

    /// Builds the step from its configuration: do heavy set-up here, it runs
    /// once per instance.
    fn new(config: Self::Config) -> Result<Self, Error>;

    /// Runs the step on one input.
    fn run(&mut self, input: Self::Input) -> Result<Self::Output, Error>;
}

/// A loader: serves named assets to steps.
pub trait Loader: 'static {
    /// The loader's parameters, from the flow's loader table.
    type Params: DeserializeOwned;

    /// Returns the bytes of the asset `name`.
    fn load(name: &str, params: Self::Params) -> Result<Vec<u8>, Error>;
}

/// Why a step or a load failed: becomes the contract's `step-error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    /// A short machine-readable code, such as `bad-input`.
    pub code: String,
    /// What went wrong, for a person.
    pub message: String,
    /// Whether trying again may succeed.
    pub retryable: bool,
}

impl Error {
    /// An error with a code and a message; not retryable.
    pub fn new(code: impl Into<String>, message: impl fmt::Display) -> Self {
        Error { code: code.into(), message: message.to_string(), retryable: false }
    }

    /// The step's input is not what it accepts.
    pub fn bad_input(message: impl fmt::Display) -> Self {
        Error::new("bad-input", message)
    }

    /// The step's configuration is not what it accepts.
    pub fn bad_config(message: impl fmt::Display) -> Self {
        Error::new("bad-config", message)
    }

    /// Marks the error as one that may pass if the call is tried again.
    pub fn retryable(mut self) -> Self {
        self.retryable = true;
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl From<Error> for StepError {
    fn from(e: Error) -> StepError {
        StepError { code: e.code, message: e.message, retryable: e.retryable }
    }
}

impl From<StepError> for Error {
    fn from(e: StepError) -> Error {
        Error { code: e.code, message: e.message, retryable: e.retryable }
    }
}

/// Writes a line to the run's log.
pub fn log(level: Level, message: &str) {
    host::log(level.into(), message);
}

/// Reads an asset served by one of the flow's loaders, named `loader-id/name`.
pub fn asset(name: &str) -> Result<Vec<u8>, Error> {
    host::asset(name).map_err(Error::from)
}

/// The severity of a [`log`] line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Detail useful while debugging.
    Debug,
    /// Normal progress.
    Info,
    /// Something unexpected that the plugin recovered from.
    Warn,
    /// A failure.
    Error,
}

impl From<Level> for LogLevel {
    fn from(level: Level) -> LogLevel {
        match level {
            Level::Trace => LogLevel::Trace,
            Level::Debug => LogLevel::Debug,
            Level::Info => LogLevel::Info,
            Level::Warn => LogLevel::Warn,
            Level::Error => LogLevel::Error,
        }
    }
}

/// What [`export_step!`] and [`export_loader!`] expand to call; not for plugin authors.
#[doc(hidden)]
pub mod __private {
    use super::*;

    pub use step_bindings::qflow::plugin::types::{PluginInfo, PluginKind, StepError};

    /// The instance's step, built by `init`.
    pub type Slot<S> = LocalKey<RefCell<Option<S>>>;

    pub fn info(
        kind: PluginKind,
        name: &str,
        version: &str,
        description: &str,
        assets: &[&str],
        needs: &[&str],
    ) -> PluginInfo {
        let owned = |list: &[&str]| list.iter().map(|s| (*s).to_owned()).collect();
        PluginInfo {
            name: name.to_owned(),
            version: version.to_owned(),
            description: description.to_owned(),
            kind,
            assets: owned(assets),
            needs: owned(needs),
        }
    }

    pub fn init<S: Step>(slot: &'static Slot<S>, config: &str) -> Result<(), StepError> {
        let step = build::<S>(config)?;
        slot.with(|cell| *cell.borrow_mut() = Some(step));
        Ok(())
    }

    pub fn run<S: Step>(slot: &'static Slot<S>, input: &str) -> Result<String, StepError> {
        slot.with(|cell| {
            let mut cell = cell.borrow_mut();
            // A host that calls `run` first gets the step's default
            // configuration, so a step that needs none works without `init`.
            let step = match cell.as_mut() {
                Some(step) => step,
                None => cell.insert(build::<S>("{}")?),
            };
            let input: S::Input = parse(input).map_err(Error::bad_input)?;
            let output = step.run(input)?;
            serde_json::to_string(&output)
                .map_err(|e| Error::new("bad-output", format!("output is not JSON: {e}")).into())
        })
    }

    pub fn load<L: Loader>(name: &str, params: &str) -> Result<Vec<u8>, StepError> {
        let params: L::Params = parse(params).map_err(Error::bad_config)?;
        Ok(L::load(name, params)?)
    }

    fn build<S: Step>(config: &str) -> Result<S, Error> {
        let config: S::Config = parse(config).map_err(Error::bad_config)?;
        S::new(config)
    }

    /// Parses JSON, treating an empty object as `null` for types (such as
    /// `()`) that take no fields, so a step without configuration accepts `{}`.
    fn parse<T: DeserializeOwned>(json: &str) -> Result<T, serde_json::Error> {
        serde_json::from_str(json).or_else(|e| {
            if json.trim() == "{}" { serde_json::from_str("null").map_err(|_| e) } else { Err(e) }
        })
    }
}

/// Exports a [`Step`] as the plugin's `step` world, with a one-line
/// description, and optionally the assets it reads and the plugins it needs
/// (`assets = ["data/words.txt"], needs = ["other"]`), which the host loads
/// first. The plugin's name and version are its crate's.
#[macro_export]
macro_rules! export_step {
    ($step:ty, $description:expr $(, assets = [$($asset:expr),* $(,)?])? $(, needs = [$($need:expr),* $(,)?])? $(,)?) => {
        thread_local! {
            static __QFLOW_STEP: ::std::cell::RefCell<Option<$step>> =
                const { ::std::cell::RefCell::new(None) };
        }

        struct __QflowStep;

        impl $crate::step_bindings::Guest for __QflowStep {
            fn describe() -> $crate::__private::PluginInfo {
                $crate::__private::info(
                    $crate::__private::PluginKind::Step,
                    env!("CARGO_PKG_NAME"),
                    env!("CARGO_PKG_VERSION"),
                    $description,
                    &[$($($asset),*)?],
                    &[$($($need),*)?],
                )
            }

            fn init(config: String) -> Result<(), $crate::__private::StepError> {
                $crate::__private::init::<$step>(&__QFLOW_STEP, &config)
            }

            fn run(input: String) -> Result<String, $crate::__private::StepError> {
                $crate::__private::run::<$step>(&__QFLOW_STEP, &input)
            }
        }

        $crate::step_bindings::export_step_world!(__QflowStep with_types_in $crate::step_bindings);
    };
}

/// Exports a [`Loader`] as the plugin's `loader` world, with a one-line
/// description, and optionally the plugins it needs (`needs = ["other"]`).
#[macro_export]
macro_rules! export_loader {
    ($loader:ty, $description:expr $(, needs = [$($need:expr),* $(,)?])? $(,)?) => {
        struct __QflowLoader;

        impl $crate::loader_bindings::Guest for __QflowLoader {
            fn describe() -> $crate::__private::PluginInfo {
                $crate::__private::info(
                    $crate::__private::PluginKind::Loader,
                    env!("CARGO_PKG_NAME"),
                    env!("CARGO_PKG_VERSION"),
                    $description,
                    &[],
                    &[$($($need),*)?],
                )
            }

            fn load(name: String, params: String) -> Result<Vec<u8>, $crate::__private::StepError> {
                $crate::__private::load::<$loader>(&name, &params)
            }
        }

        $crate::loader_bindings::export_loader_world!(__QflowLoader with_types_in $crate::loader_bindings);
    };
}

/// Outbound HTTP from a step, over the standard `wasi:http` interfaces: the
/// host sends it only where the step's `http` grants allow, over its pooled
/// connections.
///
/// ```ignore
/// let response = qflow_sdk::http::get("http://127.0.0.1:8089/orders")?;
/// let orders: Vec<Order> = response.json()?;
/// ```
pub mod http {
    use serde::de::DeserializeOwned;
    use wasi::http::outgoing_handler;
    use wasi::http::types::{
        ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions,
        Scheme,
    };
    use wasi::io::streams::StreamError;

    use super::Error;

    /// A response, read whole.
    #[derive(Debug, Clone)]
    pub struct Response {
        /// The status code.
        pub status: u16,
        /// The headers, as sent.
        pub headers: Vec<(String, Vec<u8>)>,
        /// The body.
        pub body: Vec<u8>,
    }

    impl Response {
        /// The body as UTF-8 text.
        pub fn text(&self) -> Result<&str, Error> {
            std::str::from_utf8(&self.body)
                .map_err(|e| Error::new("http-body", format!("not UTF-8 text: {e}")))
        }

        /// The body as JSON.
        pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
            serde_json::from_slice(&self.body)
                .map_err(|e| Error::new("http-body", format!("not the JSON expected: {e}")))
        }

        /// A header's first value, as text.
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .and_then(|(_, v)| std::str::from_utf8(v).ok())
        }
    }

    /// `GET url`.
    pub fn get(url: &str) -> Result<Response, Error> {
        request("GET", url, &[], None)
    }

    /// Sends `method url` with `headers` and an optional `body`, and reads
    /// the response whole. A request the host refuses (no grant, an internal
    /// address, a limit) fails with the host's reason; so does a response
    /// over the host's size limit.
    pub fn request(
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<Response, Error> {
        request_within(method, url, headers, body, None)
    }

    /// [`request`], failing with `http-timeout` if the response's headers
    /// take longer than `timeout` (the host's own limit applies too: the
    /// shorter one wins).
    pub fn request_within(
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        timeout: Option<std::time::Duration>,
    ) -> Result<Response, Error> {
        let bad_url = |why: &str| Error::new("http-url", format!("{url}: {why}"));
        let (scheme, rest) =
            url.split_once("://").ok_or_else(|| bad_url("no scheme (http:// or https://)"))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => Scheme::Other(other.to_owned()),
        };
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => (&rest[..i], rest[i..].to_owned()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_owned()),
        };
        if authority.is_empty() {
            return Err(bad_url("no host"));
        }
        let fields: Vec<(String, Vec<u8>)> =
            headers.iter().map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())).collect();
        let fields =
            Fields::from_list(&fields).map_err(|e| Error::new("http-header", format!("{e:?}")))?;
        let request = OutgoingRequest::new(fields);
        let method = match method.to_ascii_uppercase().as_str() {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "HEAD" => Method::Head,
            "OPTIONS" => Method::Options,
            other => Method::Other(other.to_owned()),
        };
        let rejected = |what: &str| Error::new("http-request", format!("{url}: bad {what}"));
        request.set_method(&method).map_err(|()| rejected("method"))?;
        request.set_scheme(Some(&scheme)).map_err(|()| rejected("scheme"))?;
        request.set_authority(Some(authority)).map_err(|()| rejected("host"))?;
        request.set_path_with_query(Some(&path)).map_err(|()| rejected("path"))?;
        let outgoing = request.body().map_err(|()| rejected("body"))?;
        let options = match timeout {
            Some(timeout) => {
                let options = RequestOptions::new();
                let ns = u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX);
                options.set_first_byte_timeout(Some(ns)).map_err(|()| rejected("timeout"))?;
                Some(options)
            }
            None => None,
        };
        let pending = outgoing_handler::handle(request, options).map_err(|e| failed(url, &e))?;
        // A request the host refuses stops taking its body: the reason is
        // then the response's error, so that comes first.
        let mut sending = Ok(());
        if let Some(bytes) = body {
            let stream = outgoing.write().map_err(|()| rejected("body"))?;
            for chunk in bytes.chunks(4096) {
                if let Err(e) = stream.blocking_write_and_flush(chunk) {
                    sending = Err(stream_failed(url, e));
                    break;
                }
            }
        }
        if let Err(e) = OutgoingBody::finish(outgoing, None) {
            sending = sending.and(Err(failed(url, &e)));
        }

        pending.subscribe().block();
        let response = match pending.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(e))) => return Err(failed(url, &e)),
            Some(Err(())) | None => return Err(Error::new("http", format!("{url}: no response"))),
        };
        sending?;
        let status = response.status();
        let headers = response.headers().entries();
        let incoming =
            response.consume().map_err(|()| Error::new("http", format!("{url}: no body")))?;
        let stream =
            incoming.stream().map_err(|()| Error::new("http", format!("{url}: no body")))?;
        let mut body = Vec::new();
        loop {
            match stream.blocking_read(64 << 10) {
                Ok(chunk) => body.extend_from_slice(&chunk),
                Err(StreamError::Closed) => break,
                Err(e) => return Err(stream_failed(url, e)),
            }
        }
        drop(stream);
        drop(IncomingBody::finish(incoming));
        Ok(Response { status, headers, body })
    }

    /// The host's reason, where it gave one; else the error code.
    fn failed(url: &str, code: &ErrorCode) -> Error {
        let code_name = match code {
            ErrorCode::HttpRequestDenied => "http-denied",
            ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout => "http-timeout",
            ErrorCode::HttpResponseBodySize(_) | ErrorCode::HttpRequestBodySize(_) => {
                "http-too-large"
            }
            _ => "http",
        };
        let message = match code {
            ErrorCode::InternalError(Some(reason)) => reason.clone(),
            ErrorCode::HttpResponseBodySize(Some(limit)) => {
                format!("the response is over the host's limit of {limit} bytes")
            }
            ErrorCode::HttpRequestBodySize(Some(limit)) => {
                format!("the request is over the host's limit of {limit} bytes")
            }
            ErrorCode::ConnectionReadTimeout => {
                "no response within the time limit (the step's, or the host's)".to_owned()
            }
            other => format!("{other:?}"),
        };
        let mut error = Error::new(code_name, format!("{url}: {message}"));
        if matches!(code, ErrorCode::ConnectionReadTimeout | ErrorCode::ConnectionRefused) {
            error = error.retryable();
        }
        error
    }

    fn stream_failed(url: &str, error: StreamError) -> Error {
        match error {
            StreamError::LastOperationFailed(e) => match wasi::http::types::http_error_code(&e) {
                Some(code) => failed(url, &code),
                None => Error::new("http", format!("{url}: {}", e.to_debug_string())),
            },
            StreamError::Closed => Error::new("http", format!("{url}: the connection closed")),
        }
    }
}

/// SQL from a step, over `qflow:plugin/sql`: the host runs statements on
/// the databases the step's `databases` grant names, over its pooled
/// connections. Parameters (`$1`, `$2`, …) are bound by the database,
/// never spliced into the statement.
///
/// ```ignore
/// use qflow_sdk::sql::{self, Value};
///
/// #[derive(serde::Deserialize)]
/// struct Order { id: i64, total: f64 }
///
/// let big: Vec<Order> =
///     sql::query("orders", "SELECT id, total FROM orders WHERE total > $1", &[100.0.into()])?;
/// let n = sql::execute("orders", "DELETE FROM orders WHERE id = $1", &[Value::Integer(7)])?;
/// ```
pub mod sql {
    use serde::de::DeserializeOwned;
    use serde_json::Value as Json;

    use crate::step_bindings::qflow::plugin::sql as raw;
    pub use crate::step_bindings::qflow::plugin::sql::{SqlErrorKind as ErrorKind, Value};

    use super::Error;

    /// Runs a statement that returns rows, each read as a `T` (a struct
    /// with a field per column, or `serde_json::Value`).
    pub fn query<T: DeserializeOwned>(
        db: &str,
        statement: &str,
        params: &[Value],
    ) -> Result<Vec<T>, Error> {
        let rows = raw::query(db, statement, params).map_err(error)?;
        serde_json::from_str(&rows)
            .map_err(|e| Error::new("sql-rows", format!("the rows are not the ones expected: {e}")))
    }

    /// Runs a statement that changes rows; returns how many it changed.
    pub fn execute(db: &str, statement: &str, params: &[Value]) -> Result<u64, Error> {
        raw::execute(db, statement, params).map_err(error)
    }

    /// A JSON value as a parameter: null, a boolean, an integer, a real or
    /// text; arrays and objects are bound as their JSON text.
    pub fn param(value: &Json) -> Value {
        match value {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Boolean(*b),
            Json::Number(n) => match n.as_i64() {
                Some(i) => Value::Integer(i),
                None => Value::Real(n.as_f64().unwrap_or(f64::NAN)),
            },
            Json::String(s) => Value::Text(s.clone()),
            other => Value::Text(other.to_string()),
        }
    }

    /// The host's error as the step's: its kind is the code (`sql-syntax`,
    /// `sql-constraint` …), and an unavailable database or a timeout is
    /// worth retrying.
    fn error(e: raw::SqlError) -> Error {
        let (code, retryable) = match e.kind {
            ErrorKind::UnknownDatabase => ("sql-unknown-database", false),
            ErrorKind::ReadOnly => ("sql-read-only", false),
            ErrorKind::Syntax => ("sql-syntax", false),
            ErrorKind::Constraint => ("sql-constraint", false),
            ErrorKind::Timeout => ("sql-timeout", true),
            ErrorKind::Unavailable => ("sql-unavailable", true),
            ErrorKind::Unsupported => ("sql-unsupported", false),
            ErrorKind::Other => ("sql-error", false),
        };
        let error = Error::new(code, e.message);
        if retryable { error.retryable() } else { error }
    }

    impl From<i64> for Value {
        fn from(i: i64) -> Value {
            Value::Integer(i)
        }
    }

    impl From<f64> for Value {
        fn from(f: f64) -> Value {
            Value::Real(f)
        }
    }

    impl From<bool> for Value {
        fn from(b: bool) -> Value {
            Value::Boolean(b)
        }
    }

    impl From<&str> for Value {
        fn from(s: &str) -> Value {
            Value::Text(s.to_owned())
        }
    }

    impl From<String> for Value {
        fn from(s: String) -> Value {
            Value::Text(s)
        }
    }

    impl<T: Into<Value>> From<Option<T>> for Value {
        fn from(value: Option<T>) -> Value {
            value.map_or(Value::Null, Into::into)
        }
    }
}
