//! Every `bindgen!` expansion of the WIT contract (`wit/qflow.wit`) lives here.

/// The `step` world: the host calls `describe`, `init` and `run`.
pub(crate) mod step {
    wasmtime::component::bindgen!({
        world: "step",
        path: "../wit",
        imports: {
            // Serving an asset may run a loader plugin: async, so that a step
            // waiting for one holds no thread.
            "qflow:plugin/host.asset": async,
        },
        exports: { default: async },
    });
}

/// The `loader` world: the host calls `describe` and `load`.
pub(crate) mod loader {
    wasmtime::component::bindgen!({
        world: "loader",
        path: "../wit",
        exports: { default: async },
        // The shared types and the host interface come from the step world,
        // so both worlds use one `PluginInfo`, one `StepError`, one `Host`.
        with: {
            "qflow:plugin/types": super::step::qflow::plugin::types,
            "qflow:plugin/host": super::step::qflow::plugin::host,
        },
    });
}

pub(crate) use step::qflow::plugin::host;
pub(crate) use step::qflow::plugin::types::{LogLevel, PluginInfo, PluginKind, StepError};
