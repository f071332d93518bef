//! Hot reload: a watcher on the plugins directory. Changes are debounced
//! (a burst of writes is one reload), a file must stop changing before it is
//! read, and a new version is compiled, linked and described before it
//! replaces the old one — so a half-written or broken file never serves.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::catalog::{Catalog, Reload};
use super::instances::Pools;
use super::plugin::PluginError;
use crate::model::{Emitter, EventData, error_chain, printable};
use notify_debouncer_mini::notify::{RecommendedWatcher, RecursiveMode};
use notify_debouncer_mini::{DebounceEventResult, Debouncer, new_debouncer};

/// How long a plugin file must be quiet before it is reloaded: a copy in
/// progress writes far more often than this.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// How long a file's size and time must hold still before it is read.
const SETTLE: Duration = Duration::from_millis(50);

/// Swaps plugins in and out, and says so.
#[derive(Clone)]
pub(crate) struct Reloader {
    pub(crate) catalog: Arc<Catalog>,
    pub(crate) pools: Arc<Pools>,
    pub(crate) events: Emitter,
}

impl Reloader {
    /// Reloads `name` now: see [`Catalog::reload`]. The old version's pools
    /// are drained; runs in flight finish on the version they started with.
    pub(crate) async fn reload(&self, name: &str) -> Result<(), PluginError> {
        let plugin: Arc<str> = Arc::from(name);
        let emit = |event| self.events.emit(|| event);
        match self.catalog.reload(name).await {
            Ok(Reload::Unchanged) => {}
            Ok(Reload::Added { version, .. }) => {
                tracing::info!("plugin {name} {} added", printable(&version));
                emit(EventData::PluginAdded { plugin, version });
            }
            Ok(Reload::Replaced { old, version, .. }) => {
                tracing::info!("plugin {name} reloaded: now {}", printable(&version));
                self.pools.retire(&old);
                emit(EventData::PluginReloaded { plugin, version });
            }
            Ok(Reload::Removed { old }) => {
                tracing::info!("plugin {name} removed");
                self.pools.retire(&old);
                emit(EventData::PluginRemoved { plugin });
            }
            Err(e) => {
                let error = error_chain(&e);
                tracing::warn!(
                    "plugin {name} was not reloaded, the old version goes on serving: {}",
                    printable(&error)
                );
                emit(EventData::PluginReloadFailed { plugin, error });
                return Err(e);
            }
        }
        Ok(())
    }
}

/// A running watch of the plugins directory; dropping it stops watching.
pub struct Watch {
    _debouncer: Debouncer<RecommendedWatcher>,
    task: tokio::task::JoinHandle<()>,
    catalog: Arc<Catalog>,
}

impl Drop for Watch {
    /// Stops watching; plugin files are checked on every use again.
    fn drop(&mut self) {
        self.task.abort();
        self.catalog.set_watched(false);
    }
}

/// Starts watching `dir`; must be called inside a tokio runtime.
pub(crate) fn start(
    dir: &Path,
    reloader: Reloader,
) -> notify_debouncer_mini::notify::Result<Watch> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<DebounceEventResult>();
    let mut debouncer = new_debouncer(DEBOUNCE, move |result| {
        // The receiver goes only when the watch is dropped.
        let _ = tx.send(result);
    })?;
    debouncer.watcher().watch(dir, RecursiveMode::NonRecursive)?;
    reloader.catalog.set_watched(true);
    let catalog = reloader.catalog.clone();
    let task = tokio::spawn(async move {
        while let Some(result) = rx.recv().await {
            match result {
                Ok(events) => {
                    let mut names: Vec<String> =
                        events.iter().filter_map(|e| plugin_name(&e.path)).collect();
                    // A changed settings file is read again on next use:
                    // new steps get pools with the new settings.
                    for name in events.iter().filter_map(|e| settings_name(&e.path)) {
                        reloader.catalog.forget_settings(&name);
                    }
                    names.sort();
                    names.dedup();
                    for name in names {
                        settle(&reloader.catalog.dir().join(format!("{name}.wasm"))).await;
                        // Failures were reported as events and a log line.
                        let _ = reloader.reload(&name).await;
                    }
                }
                Err(e) => tracing::warn!("watching the plugins directory failed: {e}"),
            }
        }
    });
    Ok(Watch { _debouncer: debouncer, task, catalog })
}

/// The plugin a path in the plugins directory is: `NAME.wasm`.
fn plugin_name(path: &Path) -> Option<String> {
    if path.extension()? != "wasm" {
        return None;
    }
    path.file_stem()?.to_str().map(str::to_owned)
}

/// The plugin whose settings file a path is: `NAME.plugin.toml`.
fn settings_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    file.strip_suffix(".plugin.toml").map(str::to_owned)
}

/// Waits (a little) until the file stops changing.
async fn settle(path: &PathBuf) {
    let look = || std::fs::metadata(path).ok().map(|m| (m.len(), m.modified().ok()));
    let mut last = look();
    for _ in 0..20 {
        tokio::time::sleep(SETTLE).await;
        let now = look();
        if now == last {
            return;
        }
        last = now;
    }
}
