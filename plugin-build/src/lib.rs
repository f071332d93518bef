//! Builds Qflow plugins into WebAssembly components.
//!
//! One way to turn a plugin project into components in a plugins directory,
//! shared by `qflow build` and the tests:
//! - a Rust crate (or a workspace of them): cargo for `wasm32-wasip2`, whose
//!   linker emits a component directly; every `cdylib` is copied to
//!   `OUT/<package>.wasm`;
//! - a Python project (`pyproject.toml` or `app.py`): componentize-py;
//! - a JavaScript project (`package.json`): componentize-js.
//!
//! The Python and JavaScript tools are pinned and installed on first use
//! (see [`lang`]); `qflow new` writes a project in any of the three
//! ([`new_project`]).

pub mod lang;
mod new;

pub use self::lang::{Check, Lang, doctor};
pub use self::new::new_project;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The target every plugin is built for: its linker emits a component.
pub const TARGET: &str = "wasm32-wasip2";

/// How to build.
#[derive(Debug, Clone)]
pub struct Options {
    /// Build with the release profile (small, fast components); on by default.
    pub release: bool,
    /// Cargo's target directory; cargo's own default when `None`.
    pub target_dir: Option<PathBuf>,
    /// Where the Python and JavaScript toolchains are installed;
    /// `~/.cache/qflow/toolchains` when `None`.
    pub toolchains: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options { release: true, target_dir: None, toolchains: None }
    }
}

/// A component placed in the output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    /// The plugin's name: its package name.
    pub name: String,
    /// Where the component now is.
    pub path: PathBuf,
}

/// Why a build failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// There is no project where the plugin should be.
    #[error(
        "{0}: no plugin project here (Cargo.toml for Rust, pyproject.toml or app.py for Python, package.json for JavaScript); `qflow new NAME --lang rust|python|js` makes one"
    )]
    NoManifest(PathBuf),
    /// The project is not one that can be built as it is.
    #[error("{0}")]
    Project(String),
    /// A Python or JavaScript build tool failed, or could not be installed.
    #[error("{tool} failed: {message}")]
    Tool {
        /// The tool, and what to install if it is missing.
        tool: String,
        /// What it said.
        message: String,
    },
    /// Cargo could not be started.
    #[error("could not run cargo: {0}")]
    Spawn(#[source] std::io::Error),
    /// The `wasm32-wasip2` target is not installed and could not be added.
    #[error("the {TARGET} target is not installed and `rustup target add {TARGET}` failed: {0}")]
    Target(String),
    /// Cargo failed; its diagnostics went to standard error.
    #[error("cargo build failed for {manifest} ({status}); its errors are printed above")]
    Cargo {
        /// The manifest that was built.
        manifest: PathBuf,
        /// How cargo exited.
        status: std::process::ExitStatus,
    },
    /// Cargo succeeded but built no component (no `cdylib` crate).
    #[error(
        "{0}: built, but no crate here is a cdylib; a plugin needs `[lib] crate-type = [\"cdylib\"]`"
    )]
    NoComponents(PathBuf),
    /// Copying a component into place failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
}

/// Builds the plugin project at `path` (Rust, Python or JavaScript) and
/// places its components in `out_dir`, named after their projects.
pub fn build(path: &Path, out_dir: &Path, options: &Options) -> Result<Vec<Built>, Error> {
    let toolchains = options.toolchains.as_deref();
    match Lang::of(path) {
        Some(Lang::Rust) => build_rust(path, out_dir, options),
        Some(Lang::Python) => Ok(vec![lang::build_python(path, out_dir, toolchains)?]),
        Some(Lang::JavaScript) => Ok(vec![lang::build_js(path, out_dir, toolchains)?]),
        None => Err(Error::NoManifest(path.to_path_buf())),
    }
}

fn build_rust(path: &Path, out_dir: &Path, options: &Options) -> Result<Vec<Built>, Error> {
    let manifest = path.join("Cargo.toml");
    ensure_target()?;

    let mut cmd = cargo();
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(&manifest)
        .args(["--target", TARGET, "--message-format=json-render-diagnostics"])
        .stdout(Stdio::piped());
    if options.release {
        cmd.arg("--release");
    }
    if let Some(dir) = &options.target_dir {
        cmd.env("CARGO_TARGET_DIR", dir);
    }
    let mut child = cmd.spawn().map_err(Error::Spawn)?;
    let mut components = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.map_err(Error::Spawn)?;
            components.extend(component_in(&line));
        }
    }
    let status = child.wait().map_err(Error::Spawn)?;
    if !status.success() {
        return Err(Error::Cargo { manifest, status });
    }
    if components.is_empty() {
        return Err(Error::NoComponents(path.to_path_buf()));
    }

    std::fs::create_dir_all(out_dir)
        .map_err(|source| Error::Io { path: out_dir.to_path_buf(), source })?;
    components
        .into_iter()
        .map(|(name, artifact)| {
            let dest = out_dir.join(format!("{name}.wasm"));
            place(&artifact, &dest)?;
            Ok(Built { name, path: dest })
        })
        .collect()
}

/// Copies through a temporary file and renames, so a host watching `dest`
/// never sees half a component (and concurrent builds never share a file).
pub(crate) fn place(artifact: &Path, dest: &Path) -> Result<(), Error> {
    let tmp = dest.with_extension(format!("wasm.{}.tmp", std::process::id()));
    std::fs::copy(artifact, &tmp)
        .and_then(|_| std::fs::rename(&tmp, dest))
        .map_err(|source| Error::Io { path: dest.to_path_buf(), source })
}

/// The package name and `.wasm` file of a `compiler-artifact` message for a cdylib.
fn component_in(line: &str) -> Option<(String, PathBuf)> {
    let msg: serde_json::Value = serde_json::from_str(line).ok()?;
    if msg.get("reason")?.as_str()? != "compiler-artifact" {
        return None;
    }
    let kinds = msg.pointer("/target/kind")?.as_array()?;
    if !kinds.iter().any(|k| k.as_str() == Some("cdylib")) {
        return None;
    }
    let wasm = msg
        .get("filenames")?
        .as_array()?
        .iter()
        .filter_map(|f| f.as_str())
        .find(|f| f.ends_with(".wasm"))?;
    let name = package_name(msg.get("package_id")?.as_str()?)?;
    Some((name, PathBuf::from(wasm)))
}

/// The name in a package id: `path+file:///p/file-loader#0.1.0` (the name is
/// the directory's) or `path+file:///p/dir#name@0.1.0`.
fn package_name(id: &str) -> Option<String> {
    let (url, fragment) = id.rsplit_once('#')?;
    match fragment.split_once('@') {
        Some((name, _version)) => Some(name.to_owned()),
        None => url.rsplit('/').next().map(str::to_owned),
    }
}

/// Cargo, cleaned of what an outer cargo (a build script's, or `cargo
/// clippy`'s) sets for its own build and must not leak into this one.
fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        let leaks = key.starts_with("CARGO_ENCODED_")
            || key.starts_with("CARGO_BUILD_")
            || key.starts_with("CARGO_PROFILE_")
            || matches!(
                key,
                "CARGO_TARGET_DIR" | "RUSTFLAGS" | "RUSTC_WRAPPER" | "RUSTC_WORKSPACE_WRAPPER"
            );
        if leaks {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Installs the target through rustup when it is missing (a fresh machine).
fn ensure_target() -> Result<(), Error> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let libdir =
        Command::new(&rustc).args(["--print", "target-libdir", "--target", TARGET]).output();
    if let Ok(out) = libdir {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if out.status.success() && Path::new(&dir).is_dir() {
            return Ok(());
        }
    }
    let added =
        Command::new("rustup").args(["target", "add", TARGET]).stdout(Stdio::null()).status();
    match added {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(Error::Target(status.to_string())),
        Err(e) => Err(Error::Target(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_names_from_ids() {
        assert_eq!(
            package_name("path+file:///w/plugins/file-loader#0.1.0").as_deref(),
            Some("file-loader")
        );
        assert_eq!(package_name("path+file:///w/plugins/x#jq@0.1.0").as_deref(), Some("jq"));
        assert_eq!(package_name("no-fragment"), None);
    }

    #[test]
    fn only_cdylib_artifacts_are_components() {
        let lib = r#"{"reason":"compiler-artifact","package_id":"path+file:///p/sdk#0.1.0","target":{"kind":["lib"]},"filenames":["/t/libsdk.rlib"]}"#;
        let dylib = r#"{"reason":"compiler-artifact","package_id":"path+file:///p/jq#0.1.0","target":{"kind":["cdylib"]},"filenames":["/t/jq.wasm"]}"#;
        assert_eq!(component_in(lib), None);
        assert_eq!(component_in(dylib), Some(("jq".to_owned(), PathBuf::from("/t/jq.wasm"))));
        assert_eq!(component_in("not json"), None);
    }
}
