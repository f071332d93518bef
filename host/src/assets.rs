//! Assets that a run's loaders serve to its steps through `host.asset`:
//! loaded on first request, then shared by every step of the run that asks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::Value;
use tokio::sync::OnceCell;
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::bindings::StepError;
use crate::catalog::Catalog;
use crate::flow::LoaderSpec;
use crate::instance::{Caller, PluginState, describe_failure};

/// An asset's contents, shared by every step that reads it.
type Bytes = Arc<[u8]>;

/// One run's loaders and the assets they have served.
pub(crate) struct Assets {
    catalog: Arc<Catalog>,
    loaders: Vec<LoaderSpec>,
    /// One cell per asset name, so concurrent first requests load it once.
    cache: Mutex<HashMap<String, Arc<OnceCell<Bytes>>>>,
}

fn error(code: &str, message: String) -> StepError {
    StepError { code: code.to_owned(), message, retryable: false }
}

impl Assets {
    pub(crate) fn new(catalog: Arc<Catalog>, loaders: Vec<LoaderSpec>) -> Assets {
        Assets { catalog, loaders, cache: Mutex::default() }
    }

    /// The asset `loader-id/name`, loaded on first request.
    pub(crate) async fn get(&self, name: &str) -> Result<Bytes, StepError> {
        let cell = {
            let mut cache = self.cache.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            cache.entry(name.to_owned()).or_default().clone()
        };
        // Failures are not cached: a later request tries again.
        cell.get_or_try_init(|| self.load(name)).await.cloned()
    }

    async fn load(&self, name: &str) -> Result<Bytes, StepError> {
        let Some((loader_id, asset)) = name.split_once('/') else {
            return Err(error(
                "bad-asset-name",
                format!("asset {name:?} is not named `loader-id/name`"),
            ));
        };
        let Some(spec) = self.loaders.iter().find(|l| l.id == loader_id) else {
            let ids: Vec<&str> = self.loaders.iter().map(|l| l.id.as_str()).collect();
            let ids = if ids.is_empty() { "none".to_owned() } else { ids.join(", ") };
            return Err(error(
                "no-loader",
                format!("asset {name:?}: the flow has no loader `{loader_id}` (loaders: {ids})"),
            ));
        };
        let owner = format!("loader `{}` (plugin {})", spec.id, spec.plugin);
        let plugin = self
            .catalog
            .load(&spec.plugin.name)
            .await
            .map_err(|e| error("plugin", format!("{owner}: {e}")))?;
        plugin
            .check_version(spec.plugin.version.as_deref())
            .map_err(|e| error("plugin", format!("{owner}: {e}")))?;
        let pre = plugin.loader().map_err(|e| error("plugin", format!("{owner}: {e}")))?;

        let mut wasi = WasiCtxBuilder::new();
        for mount in &spec.dirs {
            wasi.preopened_dir(&mount.host, &mount.guest, FsPerms::ReadOnly).map_err(|e| {
                error(
                    "io",
                    format!(
                        "{owner}: cannot open {} for {}: {e}",
                        mount.host.display(),
                        mount.guest
                    ),
                )
            })?;
        }
        let caller = Caller {
            name: Arc::from(format!("loader:{}", spec.id)),
            plugin: Arc::from(spec.plugin.name.as_str()),
        };
        let mut store = PluginState::store(self.catalog.engine(), caller, None, &mut wasi);
        let params = Value::Object(spec.params.clone()).to_string();
        let loaded = match pre.instantiate_async(&mut store).await {
            Ok(instance) => instance.call_load(&mut store, asset, &params).await,
            Err(e) => Err(e),
        };
        match loaded {
            Ok(Ok(bytes)) => Ok(Arc::from(bytes)),
            Ok(Err(e)) => {
                Err(StepError { message: format!("{owner}: asset {name:?}: {}", e.message), ..e })
            }
            Err(trap) => Err(error(
                "trap",
                format!("{owner}: asset {name:?}: {}", describe_failure(&trap, &store)),
            )),
        }
    }
}
