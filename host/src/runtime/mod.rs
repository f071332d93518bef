//! Everything wasmtime, and no scheduling: the engine, the bindings of the
//! contract, what a plugin is, the plugins directory, the component store
//! (memory LRU, disk cache, compiler), instance state and its sandbox, the
//! pre-warmed instance pools and the call of a step on one, loader assets,
//! and hot reload.

mod assets;
mod bindings;
mod cache;
mod catalog;
mod components;
mod disk;
mod engine;
mod http;
mod instances;
mod memory;
mod plugin;
mod preflight;
mod sandbox;
pub(crate) mod sql;
mod state;
mod watch;

pub use self::catalog::Catalog;
pub(crate) use self::catalog::USES;
pub use self::components::CacheConfig;
pub use self::engine::{EngineConfig, MemoryStats, ResetPath};
pub use self::http::HttpConfig;
pub use self::plugin::{Cause, Kind, PluginError, PluginInfo};
pub use self::sql::SqlConfig;
pub use self::watch::Watch;

pub(crate) use self::assets::{AssetCache, AssetKey, Assets, fetch as fetch_asset};
pub(crate) use self::bindings::StepError;
pub(crate) use self::components::ComponentStore;
pub(crate) use self::engine::{Engine, Reclaim};
pub(crate) use self::instances::{CallFailure, PoolKey, PoolSource, Pools};
pub(crate) use self::plugin::Plugin;
pub(crate) use self::sandbox::Grants;
pub(crate) use self::state::{AssetSource, Caller, Limits};
pub(crate) use self::watch::{Reloader, start as watch};

/// The host's asset cache, with the limits of `config`; what it evicts is
/// announced through `events`.
pub(crate) fn asset_cache(config: &CacheConfig, events: crate::model::Emitter) -> AssetCache {
    cache::Cache::new(config.asset_memory_limit, Some(config.load_timeout)).on_evict(Box::new(
        move |evicted: Vec<(AssetKey, u64)>| {
            events.emit(|| crate::model::EventData::CacheEvicted {
                cache: "assets".into(),
                bytes_freed: evicted.iter().map(|(_, size)| size).sum(),
                entries: evicted.iter().map(|(key, _)| key.label()).collect(),
                reason: "over the memory limit".into(),
            })
        },
    ))
}
