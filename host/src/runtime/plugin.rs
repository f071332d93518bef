//! What a plugin is: a component's bytes (named by their digest), compiled,
//! linked against one of the Qflow worlds and described; what it says about
//! itself; and every way using one can fail.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::bindings::{self, loader::LoaderPre, step::StepPre};
use super::state::PluginState;

/// A content digest: SHA-256 of a component's bytes.
pub(crate) type Digest = [u8; 32];

/// The digest of a component's bytes.
pub(crate) fn digest(bytes: &[u8]) -> Digest {
    sha2::Sha256::digest(bytes).into()
}

/// An error kept as a cause: shared, so that errors stay `Clone` (a load
/// that many steps await hands each of them the same error).
pub type Cause = Arc<dyn std::error::Error + Send + Sync>;

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
    /// A plugin name that could reach outside the plugins directory, or is
    /// otherwise not a name (`../x`, `a/b`, empty).
    #[error("`{0}` is not a plugin name: use letters, digits, `-` and `_`")]
    BadName(String),
    /// `NAME.wasm` is a symbolic link that leads outside the plugins directory.
    #[error("{path} leads outside the plugins directory; only files inside it are plugins")]
    Escapes {
        /// The link.
        path: PathBuf,
    },
    /// The plugins directory or a component file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The file's bytes were not those its digest was taken from: it was
    /// being written. The name's digest is forgotten, so the next load
    /// reads the file afresh.
    #[error("{path} changed while it was being loaded; try again")]
    Changed {
        /// The component file.
        path: PathBuf,
    },
    /// The file is not a valid WebAssembly component.
    #[error("{path} is not a valid WebAssembly component")]
    Compile {
        /// The component file.
        path: PathBuf,
        /// wasmtime's account.
        #[source]
        source: Cause,
    },
    /// Compiling took longer than the load timeout (the compile goes on,
    /// and fills the disk cache when it ends).
    #[error(
        "compiling {path} took longer than the load timeout of {timeout_ms} ms (it goes on in the background, and a later load finds it in the cache; raise the timeout on a slow machine)"
    )]
    Timeout {
        /// The component file.
        path: PathBuf,
        /// The load timeout.
        timeout_ms: u64,
    },
    /// The component imports something the host does not provide, or
    /// exports neither Qflow world.
    #[error(
        "{path} does not match a Qflow world (qflow:plugin/step or qflow:plugin/loader @0.1.0 or @0.2.0): {message}"
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
    /// A plugin's settings file (`NAME.plugin.toml`) is not valid.
    #[error("{path}: {message}")]
    Settings {
        /// The settings file.
        path: PathBuf,
        /// What is wrong with it.
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
    /// A plugin needs another that could not be loaded.
    #[error("plugin `{name}` needs `{needs}`")]
    Dependency {
        /// The plugin.
        name: String,
        /// The plugin it needs.
        needs: String,
        /// Why that one could not be loaded.
        #[source]
        source: Box<PluginError>,
    },
    /// Plugins need each other in a circle.
    #[error("plugins need each other in a cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    /// The host failed while loading it: a bug in the host, not the plugin.
    #[error("the host failed while loading a plugin: {0}")]
    Host(String),
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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

impl From<bindings::PluginKind> for Kind {
    fn from(kind: bindings::PluginKind) -> Kind {
        match kind {
            bindings::PluginKind::Step => Kind::Step,
            bindings::PluginKind::Loader => Kind::Loader,
        }
    }
}

/// What a plugin says about itself through `describe()`, and where it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
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
    /// The plugins it needs loaded.
    pub needs: Vec<String>,
    /// Its component file.
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub path: PathBuf,
    /// The SHA-256 digest of the file, in hex.
    pub digest: String,
    /// Where this host got its compiled code: `disk` (the precompiled
    /// cache) or `compile` (Cranelift).
    pub loaded_from: String,
    /// The contract version it was built against (`qflow:plugin@VERSION`),
    /// as its imports say; `None` if it imports nothing of the contract.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contract: Option<String>,
    /// What is odd about it, though it works: `describe()` giving a name
    /// other than its file's, which is the name flows use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// What `describe()` said, checked against the world the component implements.
#[derive(Debug, Clone)]
pub(crate) struct Described {
    /// What is odd about it, though it works (a name that is not its file's).
    pub(crate) warnings: Vec<String>,
    pub(crate) version: String,
    pub(crate) description: String,
    pub(crate) kind: Kind,
    pub(crate) assets: Vec<String>,
    pub(crate) needs: Vec<String>,
}

/// A plugin compiled, linked against the host, and described: ready to
/// instantiate. Shared by every use of the same bytes, whatever their name.
pub(crate) struct Plugin {
    pub(crate) digest: Digest,
    pub(crate) described: Described,
    pub(crate) world: World,
    /// Where its compiled code came from when it was loaded.
    pub(crate) loaded_from: LoadSource,
    /// The contract version its imports name.
    pub(crate) contract: Option<&'static str>,
}

/// Where a plugin's compiled code came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoadSource {
    /// Memory: it was loaded before.
    Memory,
    /// The precompiled disk cache.
    Disk,
    /// Cranelift.
    Compile,
}

impl LoadSource {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            LoadSource::Memory => "memory",
            LoadSource::Disk => "disk",
            LoadSource::Compile => "compile",
        }
    }
}

/// The world a plugin implements, with its pre-linked instantiator.
pub(crate) enum World {
    Step(StepPre<PluginState>),
    Loader(LoaderPre<PluginState>),
}

impl World {
    pub(crate) fn kind(&self) -> Kind {
        match self {
            World::Step(_) => Kind::Step,
            World::Loader(_) => Kind::Loader,
        }
    }

    /// Calls `describe()` in a fresh instance.
    pub(crate) async fn describe(
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

impl Plugin {
    /// Its step instantiator, if it is a step.
    pub(crate) fn step(&self, name: &str) -> Result<&StepPre<PluginState>, PluginError> {
        match &self.world {
            World::Step(pre) => Ok(pre),
            World::Loader(_) => Err(self.wrong_kind(name, Kind::Step)),
        }
    }

    /// Its loader instantiator, if it is a loader.
    pub(crate) fn loader(&self, name: &str) -> Result<&LoaderPre<PluginState>, PluginError> {
        match &self.world {
            World::Loader(pre) => Ok(pre),
            World::Step(_) => Err(self.wrong_kind(name, Kind::Loader)),
        }
    }

    /// Checks the version a flow asks for (`name@version`), if any.
    pub(crate) fn check_version(
        &self,
        name: &str,
        wanted: Option<&str>,
    ) -> Result<(), PluginError> {
        match wanted {
            Some(wanted) if wanted != self.described.version => Err(PluginError::Version {
                name: name.to_owned(),
                wanted: wanted.to_owned(),
                found: self.described.version.clone(),
            }),
            _ => Ok(()),
        }
    }

    fn wrong_kind(&self, name: &str, wanted: Kind) -> PluginError {
        PluginError::WrongKind { name: name.to_owned(), wanted, found: self.described.kind }
    }

    /// The compiled code it holds, which is what memory is spent on.
    pub(crate) fn size(&self) -> u64 {
        let pre = match &self.world {
            World::Step(pre) => pre.instance_pre(),
            World::Loader(pre) => pre.instance_pre(),
        };
        let range = pre.component().image_range();
        (range.end as usize - range.start as usize) as u64
    }
}

/// Whether `name` can name a plugin: letters, digits, `-` and `_`, so that
/// `NAME.wasm` is a file directly inside the plugins directory.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}
