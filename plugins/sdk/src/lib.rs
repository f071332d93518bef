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
        path: "../../wit",
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
        path: "../../wit",
        pub_export_macro: true,
        export_macro_name: "export_loader_world",
        default_bindings_module: "qflow_sdk::loader_bindings",
        // One set of shared types and host imports for both worlds.
        with: {
            "qflow:plugin/types@0.1.0": crate::step_bindings::qflow::plugin::types,
            "qflow:plugin/host@0.1.0": crate::step_bindings::qflow::plugin::host,
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
