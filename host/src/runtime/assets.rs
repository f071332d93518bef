//! Assets that loaders serve to steps through `host.asset`: loaded on first
//! request, kept in a byte-bounded LRU shared by every run on the host, and
//! preloaded when hot.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::bindings::StepError;
use super::cache::{Cache, LoadError};
use super::catalog::Catalog;
use super::plugin::PluginError;
use super::sandbox::Grants;
use super::state::{AssetSource, Bytes, Caller, Limits, PluginState, describe_failure};
use crate::model::{HttpGrant, LoaderSpec, Mount, PluginRef};

/// The longest one `load` call may run before it is interrupted: a request
/// gives up sooner (the store's load timeout), but the call must end too.
const LOADER_TIME_LIMIT: Duration = Duration::from_secs(300);

/// The host's asset cache.
pub(crate) type AssetCache = Cache<AssetKey, Bytes, StepError>;

/// Everything that decides an asset's bytes: which loader (plugin, params,
/// granted directories) and which name. Two flows that define the same
/// loader share its assets.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub(crate) struct AssetKey {
    /// The loader's id in the flow, for messages.
    loader_id: String,
    plugin: PluginRef,
    params: String,
    dirs: Vec<Mount>,
    #[serde(default)]
    http: Vec<HttpGrant>,
    name: String,
}

impl AssetKey {
    /// `loader-id/name`, for people.
    pub(crate) fn label(&self) -> String {
        format!("{}/{}", self.loader_id, self.name)
    }

    /// The key under which uses of this asset are counted.
    pub(crate) fn use_key(&self) -> String {
        format!("asset:{}", serde_json::to_string(self).unwrap_or_default())
    }

    /// The key a use key was made from.
    pub(crate) fn from_use_key(key: &str) -> Option<AssetKey> {
        serde_json::from_str(key.strip_prefix("asset:")?).ok()
    }
}

fn error(code: &str, message: String) -> StepError {
    StepError { code: code.to_owned(), message, retryable: false }
}

/// One run's loaders, routing `loader-id/name` to the host's asset cache.
pub(crate) struct Assets {
    catalog: Arc<Catalog>,
    cache: Arc<AssetCache>,
    loaders: Vec<LoaderSpec>,
}

impl Assets {
    pub(crate) fn new(
        catalog: Arc<Catalog>,
        cache: Arc<AssetCache>,
        loaders: Vec<LoaderSpec>,
    ) -> Assets {
        Assets { catalog, cache, loaders }
    }

    /// The asset `loader-id/name`, loaded on first request.
    pub(crate) async fn get(&self, name: &str) -> Result<Bytes, StepError> {
        let key = self.key(name)?;
        self.catalog.count_use(key.use_key());
        fetch(&self.catalog, &self.cache, key).await
    }

    fn key(&self, name: &str) -> Result<AssetKey, StepError> {
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
        Ok(AssetKey {
            loader_id: spec.id.clone(),
            plugin: spec.plugin.clone(),
            params: Value::Object(spec.params.clone()).to_string(),
            dirs: spec.dirs.clone(),
            http: spec.http.clone(),
            name: asset.to_owned(),
        })
    }
}

impl AssetSource for Assets {
    fn asset<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Bytes, StepError>> {
        self.get(name).boxed()
    }
}

/// The asset `key`: from memory, or loaded once however many ask.
pub(crate) async fn fetch(
    catalog: &Arc<Catalog>,
    cache: &Arc<AssetCache>,
    key: AssetKey,
) -> Result<Bytes, StepError> {
    let (catalog, loading) = (catalog.clone(), key.clone());
    let loaded = cache
        .get_or_load(&key, move || async move {
            let bytes = load(&catalog, &loading).await?;
            let size = bytes.len() as u64;
            Ok((bytes, size))
        })
        .await;
    loaded.map_err(|e| match e {
        LoadError::Failed(e) => e,
        other => error("load", format!("asset {:?}: {other}", key.name)),
    })
}

/// Runs the loader plugin once for the asset.
async fn load(catalog: &Catalog, key: &AssetKey) -> Result<Bytes, StepError> {
    let owner = format!("loader `{}` (plugin {})", key.loader_id, key.plugin);
    let failed =
        |e: PluginError| error("plugin", format!("{owner}: {}", crate::model::error_chain(&e)));
    let plugin = catalog.load(&key.plugin.name).await.map_err(failed)?;
    plugin.check_version(&key.plugin.name, key.plugin.version.as_deref()).map_err(failed)?;
    let pre = plugin.loader(&key.plugin.name).map_err(failed)?;

    let caller = Caller {
        name: Arc::from(format!("loader:{}", key.loader_id)),
        plugin: Arc::from(key.plugin.name.as_str()),
    };
    let deadline = tokio::time::Instant::now() + LOADER_TIME_LIMIT;
    let grants = Grants {
        dirs: key.dirs.clone(),
        env: Vec::new(),
        http: Arc::from(key.http.as_slice()),
        databases: Arc::default(),
    };
    let mut store = PluginState::host_call_store(
        catalog.engine(),
        caller,
        &grants,
        Limits::default(),
        Some(deadline),
    )
    .await
    .map_err(|e| error("io", format!("{owner}: {e}")))?;
    let name = &key.name;
    // The epoch deadline stops a guest; this stops a host call the guest is
    // stuck in (a FIFO in its directory), and frees the instance's slot.
    let loading = async {
        match pre.instantiate_async(&mut store).await {
            Ok(instance) => instance.call_load(&mut store, &key.name, &key.params).await,
            Err(e) => Err(e),
        }
    };
    let Ok(loaded) = tokio::time::timeout_at(deadline, loading).await else {
        let limit = LOADER_TIME_LIMIT.as_millis();
        return Err(error(
            "timeout",
            format!("{owner}: asset {name:?}: not loaded within {limit} ms"),
        ));
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
