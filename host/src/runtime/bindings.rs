//! Every `bindgen!` expansion of the WIT contract (`wit/<version>/qflow.wit`)
//! lives here.
//!
//! The host speaks the newest contract, `qflow:plugin@0.2.0`, and links the
//! imports of every older one beside it: a component names the version it
//! was built against in its imports, and finds it here. The exports
//! (`describe`, `init`, `run`, `load`) are the same functions over the same
//! types in every version so far, and the component model compares types by
//! their shape, so one instantiator serves components of either version.

/// The `step` world: the host calls `describe`, `init` and `run`.
pub(crate) mod step {
    wasmtime::component::bindgen!({
        world: "step",
        path: "../wit/0.2.0",
        imports: {
            // Serving an asset may run a loader plugin, and a query waits
            // for its database: async, so that a step waiting holds no
            // thread.
            "qflow:plugin/host.asset": async,
            "qflow:plugin/sql.query": async,
            "qflow:plugin/sql.execute": async,
        },
        exports: { default: async },
    });
}

/// The `loader` world: the host calls `describe` and `load`.
pub(crate) mod loader {
    wasmtime::component::bindgen!({
        world: "loader",
        path: "../wit/0.2.0",
        exports: { default: async },
        // The shared types and the host interface come from the step world,
        // so both worlds use one `PluginInfo`, one `StepError`, one `Host`.
        with: {
            "qflow:plugin/types": super::step::qflow::plugin::types,
            "qflow:plugin/host": super::step::qflow::plugin::host,
        },
    });
}

/// `qflow:plugin@0.1.0`: only its `host` interface is linked (its types are
/// 0.2.0's, which have the same shape); its exports are never called
/// through these bindings.
pub(crate) mod v0_1 {
    #![allow(dead_code)]
    wasmtime::component::bindgen!({
        world: "step",
        path: "../wit/0.1.0",
        imports: { "qflow:plugin/host.asset": async },
        with: { "qflow:plugin/types": super::step::qflow::plugin::types },
    });
}

pub(crate) use step::qflow::plugin::types::{LogLevel, PluginInfo, PluginKind, StepError};
pub(crate) use step::qflow::plugin::{host, sql};

/// The contract versions this host links, oldest first.
pub(crate) const CONTRACTS: [&str; 2] = ["0.1.0", "0.2.0"];
