//! The plugins directory: which plugins there are, and each one compiled,
//! linked and described, once, on first use.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::OnceCell;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime_wasi::WasiCtxBuilder;

use crate::bindings::{self, loader::LoaderPre, step::StepPre};
use crate::engine::Engine;
use crate::instance::{Caller, PluginState, describe_failure};

/// Why a plugin could not be used.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// No `NAME.wasm` in the plugins directory.
    #[error("no plugin `{name}` in {dir} (it has: {available})", available = list_or_none(.available))]
    NotFound {
        /// The name asked for.
        name: String,
        /// The plugins directory.
        dir: PathBuf,
        /// The plugins it does have.
        available: Vec<String>,
    },
    /// The plugins directory or a component file could not be read.
    #[error("{path}: {message}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        message: String,
    },
    /// The file is not a valid WebAssembly component.
    #[error("{path} is not a valid WebAssembly component: {message}")]
    Compile {
        /// The component file.
        path: PathBuf,
        /// wasmtime's account.
        message: String,
    },
    /// The component imports something the host does not provide, or
    /// exports neither Qflow world.
    #[error(
        "{path} does not match a Qflow world (qflow:plugin/step or qflow:plugin/loader @0.1.0): {message}"
    )]
    NoWorld {
        /// The component file.
        path: PathBuf,
        /// What is missing or extra.
        message: String,
    },
    /// `describe()` trapped or said something inconsistent.
    #[error("{path}: describe() failed: {message}")]
    Describe {
        /// The component file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The flow asks for a version the plugin is not.
    #[error("plugin `{name}` is version {found}, but the flow asks for {wanted}")]
    Version {
        /// The plugin.
        name: String,
        /// The version the flow names.
        wanted: String,
        /// The version `describe()` reports.
        found: String,
    },
    /// A step names a loader plugin, or a loader names a step plugin.
    #[error("plugin `{name}` is a {found}, not a {wanted}")]
    WrongKind {
        /// The plugin.
        name: String,
        /// What the flow needs here.
        wanted: Kind,
        /// What the plugin is.
        found: Kind,
    },
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() { "no plugins".to_owned() } else { names.join(", ") }
}

/// Which world a plugin implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// A step of a flow.
    Step,
    /// A source of assets.
    Loader,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Step => "step",
            Kind::Loader => "loader",
        })
    }
}

/// What a plugin says about itself through `describe()`, and where it is.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    /// The name flows use: the file's stem.
    pub name: String,
    /// The version it reports.
    pub version: String,
    /// What it does.
    pub description: String,
    /// Its world.
    pub kind: Kind,
    /// The assets it reads, as `loader-id/name`.
    pub assets: Vec<String>,
    /// Its component file.
    pub path: PathBuf,
}

/// A plugin compiled, linked against the host, and described: ready to
/// instantiate.
pub(crate) struct Plugin {
    pub(crate) info: PluginInfo,
    pub(crate) world: World,
}

pub(crate) enum World {
    Step(StepPre<PluginState>),
    Loader(LoaderPre<PluginState>),
}

impl World {
    fn kind(&self) -> Kind {
        match self {
            World::Step(_) => Kind::Step,
            World::Loader(_) => Kind::Loader,
        }
    }

    /// Calls `describe()` in a fresh instance.
    async fn describe(
        &self,
        store: &mut wasmtime::Store<PluginState>,
    ) -> wasmtime::Result<bindings::PluginInfo> {
        match self {
            World::Step(pre) => {
                pre.instantiate_async(&mut *store).await?.call_describe(store).await
            }
            World::Loader(pre) => {
                pre.instantiate_async(&mut *store).await?.call_describe(store).await
            }
        }
    }
}

impl From<bindings::PluginKind> for Kind {
    fn from(kind: bindings::PluginKind) -> Kind {
        match kind {
            bindings::PluginKind::Step => Kind::Step,
            bindings::PluginKind::Loader => Kind::Loader,
        }
    }
}

impl Plugin {
    pub(crate) fn step(&self) -> Result<&StepPre<PluginState>, PluginError> {
        match &self.world {
            World::Step(pre) => Ok(pre),
            World::Loader(_) => Err(self.wrong_kind(Kind::Step)),
        }
    }

    pub(crate) fn loader(&self) -> Result<&LoaderPre<PluginState>, PluginError> {
        match &self.world {
            World::Loader(pre) => Ok(pre),
            World::Step(_) => Err(self.wrong_kind(Kind::Loader)),
        }
    }

    /// Checks the version a flow asks for (`name@version`), if any.
    pub(crate) fn check_version(&self, wanted: Option<&str>) -> Result<(), PluginError> {
        match wanted {
            Some(wanted) if wanted != self.info.version => Err(PluginError::Version {
                name: self.info.name.clone(),
                wanted: wanted.to_owned(),
                found: self.info.version.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn wrong_kind(&self, wanted: Kind) -> PluginError {
        PluginError::WrongKind { name: self.info.name.clone(), wanted, found: self.info.kind }
    }
}

/// The plugins directory and the plugins loaded from it so far.
pub struct Catalog {
    dir: PathBuf,
    engine: Engine,
    linker: Linker<PluginState>,
    /// One cell per plugin name, so concurrent first uses compile it once.
    loaded: Mutex<HashMap<String, Arc<OnceCell<Arc<Plugin>>>>>,
}

impl Catalog {
    pub(crate) fn new(dir: PathBuf, engine: Engine) -> wasmtime::Result<Catalog> {
        let mut linker = Linker::new(engine.wasmtime());
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        bindings::host::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |state| state)?;
        Ok(Catalog { dir, engine, linker, loaded: Mutex::default() })
    }

    /// The plugins directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The names of the plugins in the directory (`NAME.wasm`), sorted.
    pub fn names(&self) -> Result<Vec<String>, PluginError> {
        let entries = std::fs::read_dir(&self.dir)
            .map_err(|e| PluginError::Read { path: self.dir.clone(), message: e.to_string() })?;
        let mut names: Vec<String> = entries
            .filter_map(|entry| {
                let path = entry.ok()?.path();
                let is_wasm = path.extension().is_some_and(|ext| ext == "wasm") && path.is_file();
                is_wasm.then(|| path.file_stem()?.to_str().map(str::to_owned))?
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// Whether the directory has a plugin called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.path_of(name).is_file()
    }

    fn path_of(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.wasm"))
    }

    /// Describes every plugin in the directory, compiling those not yet loaded.
    pub async fn describe_all(&self) -> Result<Vec<Result<PluginInfo, PluginError>>, PluginError> {
        let names = self.names()?;
        let loads = names.iter().map(|name| async move { Ok(self.load(name).await?.info.clone()) });
        Ok(futures::future::join_all(loads).await)
    }

    /// The plugin `name`, compiled and described on first use.
    pub(crate) async fn load(&self, name: &str) -> Result<Arc<Plugin>, PluginError> {
        let cell = {
            let mut loaded = self.loaded.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            loaded.entry(name.to_owned()).or_default().clone()
        };
        cell.get_or_try_init(|| self.compile(name)).await.cloned()
    }

    async fn compile(&self, name: &str) -> Result<Arc<Plugin>, PluginError> {
        let path = self.path_of(name);
        if !path.is_file() {
            return Err(PluginError::NotFound {
                name: name.to_owned(),
                dir: self.dir.clone(),
                available: self.names().unwrap_or_default(),
            });
        }
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|e| PluginError::Read { path: path.clone(), message: e.to_string() })?;
        // Cranelift is CPU-bound for up to seconds: keep it off the async workers.
        let engine = self.engine.wasmtime().clone();
        let component = tokio::task::spawn_blocking(move || Component::new(&engine, &bytes))
            .await
            .map_err(|e| PluginError::Compile { path: path.clone(), message: e.to_string() })?
            .map_err(|e| PluginError::Compile { path: path.clone(), message: format!("{e:#}") })?;
        let no_world = |e: wasmtime::Error| PluginError::NoWorld {
            path: path.clone(),
            message: format!("{e:#}"),
        };
        let pre = self.linker.instantiate_pre(&component).map_err(no_world)?;
        let caller = Caller { name: Arc::from("describe"), plugin: Arc::from(name) };
        let mut store = PluginState::store(&self.engine, caller, None, &mut WasiCtxBuilder::new());
        let world = match StepPre::new(pre.clone()) {
            Ok(step) => World::Step(step),
            Err(as_step) => {
                World::Loader(LoaderPre::new(pre).map_err(|as_loader| PluginError::NoWorld {
                    path: path.clone(),
                    message: format!("as a step: {as_step:#}; as a loader: {as_loader:#}"),
                })?)
            }
        };
        let info = match world.describe(&mut store).await {
            Ok(info) => info,
            Err(e) => {
                let message = describe_failure(&e, &store);
                return Err(PluginError::Describe { path, message });
            }
        };
        let (kind, said) = (world.kind(), Kind::from(info.kind));
        if said != kind {
            return Err(PluginError::Describe {
                path,
                message: format!("it says it is a {said} but implements the {kind} world"),
            });
        }
        let info = PluginInfo {
            name: name.to_owned(),
            version: info.version,
            description: info.description,
            kind,
            assets: info.assets,
            path,
        };
        Ok(Arc::new(Plugin { info, world }))
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }
}
