//! Python and JavaScript steps: componentize-py and componentize-js, each
//! pinned and installed on first use under the toolchains directory (a
//! virtual environment, an npm prefix), run against the contract's WIT and
//! the SDK compiled into this crate, so a build always uses the contract
//! and SDK of the qflow that builds.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{Built, Error, place};

/// componentize-py, pinned.
pub const COMPONENTIZE_PY: &str = "0.25.1";
/// componentize-js, pinned: it runs on Node 20 (jco 1.35's does not).
pub const COMPONENTIZE_JS: &str = "0.23.0";

/// The contract the SDKs build against.
const WIT: &str = include_str!("../../wit/0.2.0/qflow.wit");
const PYTHON_SDK: &str = include_str!("../../plugins/sdk-python/qflow_sdk/__init__.py");
const JS_SDK: &str = include_str!("../../plugins/sdk-js/qflow-sdk.js");
/// componentize-js and every package under it, pinned: a new release of a
/// dependency (jco, wizer, …) cannot change what a fresh install gets.
const JS_PACKAGE: &str = include_str!("../toolchain/componentize-js/package.json");
const JS_LOCK: &str = include_str!("../toolchain/componentize-js/package-lock.json");

/// Standard-library modules that others import lazily, inside functions
/// (`collections.Counter.most_common` imports `heapq`): componentize-py
/// bundles only what is imported while it builds, so the entry imports
/// them up front.
const LAZY_STDLIB: &[&str] = &[
    "heapq",
    "bisect",
    "copy",
    "datetime",
    "decimal",
    "fractions",
    "statistics",
    "random",
    "string",
    "textwrap",
    "base64",
    "hashlib",
    "csv",
    "uuid",
    "urllib.parse",
];

/// A language's project.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    /// A cargo crate or workspace.
    Rust,
    /// `pyproject.toml` (or `app.py`).
    Python,
    /// `package.json`.
    JavaScript,
}

impl Lang {
    /// The language of the project at `path`, by its files.
    pub fn of(path: &Path) -> Option<Lang> {
        if path.join("Cargo.toml").is_file() {
            Some(Lang::Rust)
        } else if path.join("pyproject.toml").is_file() || path.join("app.py").is_file() {
            Some(Lang::Python)
        } else if path.join("package.json").is_file() {
            Some(Lang::JavaScript)
        } else {
            None
        }
    }
}

/// A Python project's `pyproject.toml` (empty if it has none).
fn pyproject(path: &Path) -> Result<toml::Table, Error> {
    let file = path.join("pyproject.toml");
    match std::fs::read_to_string(&file) {
        Ok(text) => text
            .parse::<toml::Table>()
            .map_err(|e| Error::Project(format!("{}: {e}", file.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(toml::Table::new()),
        Err(source) => Err(Error::Io { path: file, source }),
    }
}

/// The string at `keys` in `table`, if there is one.
fn string_at(table: &toml::Table, keys: &[&str]) -> Option<String> {
    let (last, tables) = keys.split_last()?;
    let mut table = table;
    for key in tables {
        table = table.get(*key)?.as_table()?;
    }
    table.get(*last)?.as_str().map(str::to_owned)
}

/// A project's name: `name` in `pyproject.toml`'s `[project]` or in
/// `package.json`, else its directory's.
/// A text field of the JavaScript project's `package.json`, if it has one.
fn package_field(path: &Path, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(path.join("package.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json[field].as_str().map(str::to_owned)
}

fn project_name(path: &Path, lang: Lang) -> Result<String, Error> {
    let named = match lang {
        Lang::Python => string_at(&pyproject(path)?, &["project", "name"]),
        Lang::JavaScript => package_field(path, "name"),
        Lang::Rust => None,
    };
    let dir = std::fs::canonicalize(path)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let name = named.or(dir).unwrap_or_default();
    let valid =
        !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        Ok(name)
    } else {
        Err(Error::Project(format!(
            "{}: {name:?} is not a plugin name (letters, digits, `-` and `_`); set the project's name",
            path.display()
        )))
    }
}

/// Where pinned toolchains live: `toolchains` or `~/.cache/qflow/toolchains`.
fn toolchains(dir: Option<&Path>) -> PathBuf {
    let dir = match dir {
        Some(dir) => dir.to_path_buf(),
        None => {
            // Only absolute directories (the XDG rule); without one, the
            // current directory's `.qflow-cache` rather than a shared /tmp
            // where another user could plant a "toolchain".
            let absolute =
                |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
            let home = std::env::var_os("XDG_CACHE_HOME")
                .and_then(absolute)
                .or_else(|| std::env::var_os("HOME").and_then(absolute).map(|h| h.join(".cache")))
                .unwrap_or_else(|| PathBuf::from(".qflow-cache"));
            home.join("qflow").join("toolchains")
        }
    };
    // The tools run in other directories.
    std::path::absolute(&dir).unwrap_or(dir)
}

/// The project's directory, absolute: the tools run elsewhere.
fn absolute(path: &Path) -> Result<PathBuf, Error> {
    std::fs::canonicalize(path).map_err(io(path))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io { path: path.to_path_buf(), source }
}

/// Runs a tool, its output shown only if it fails.
fn run(what: &str, command: &mut Command) -> Result<(), Error> {
    let output = command.stdin(Stdio::null()).output().map_err(|e| Error::Tool {
        tool: what.to_owned(),
        message: format!("could not start {}: {e}", Path::new(command.get_program()).display()),
    })?;
    if output.status.success() {
        return Ok(());
    }
    let mut message = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !stdout.trim().is_empty() {
        message = format!("{}\n{message}", stdout.trim());
    }
    Err(Error::Tool { tool: what.to_owned(), message: format!("{} ({})", message, output.status) })
}

/// Installs a pinned tool into `dir` once: under a lock (builds at once
/// install it once), marked complete only when the install succeeded.
/// `needs` are files the installed tool runs through (a venv's python,
/// a link into the interpreter it was made from): one gone (the system's
/// Python upgraded) means the install is redone rather than trusted.
fn installed(
    dir: &Path,
    tool: PathBuf,
    needs: &[PathBuf],
    install: impl FnOnce() -> Result<(), Error>,
) -> Result<PathBuf, Error> {
    let done = dir.join(".qflow-installed");
    let ready = || done.is_file() && tool.is_file() && needs.iter().all(|n| n.exists());
    if ready() {
        return Ok(tool);
    }
    let parent = dir.parent().unwrap_or(dir);
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let lock_path = dir.with_extension("lock");
    let lock = std::fs::File::create(&lock_path).map_err(io(&lock_path))?;
    lock.lock().map_err(io(&lock_path))?;
    if ready() {
        return Ok(tool);
    }
    let _ = std::fs::remove_dir_all(dir);
    install()?;
    if !tool.is_file() {
        return Err(Error::Tool {
            tool: tool.display().to_string(),
            message: "the install succeeded, but the program is missing".into(),
        });
    }
    std::fs::write(&done, b"").map_err(io(&done))?;
    Ok(tool)
}

/// Where componentize-py's venv is, and the program in it.
fn py_paths(toolchains: &Path) -> (PathBuf, PathBuf) {
    let venv = toolchains.join(format!("componentize-py-{COMPONENTIZE_PY}"));
    let tool = venv.join("bin").join("componentize-py");
    (venv, tool)
}

/// Where componentize-js's npm prefix is, and the program in it.
fn js_paths(toolchains: &Path) -> (PathBuf, PathBuf) {
    let prefix = toolchains.join(format!("componentize-js-{COMPONENTIZE_JS}"));
    let tool = prefix.join("node_modules").join(".bin").join("componentize-js");
    (prefix, tool)
}

/// componentize-py in a virtual environment of its own, made on first use.
fn componentize_py(toolchains: &Path) -> Result<PathBuf, Error> {
    let (venv, tool) = py_paths(toolchains);
    // `exists` follows the venv's link to the interpreter it was made from.
    let python = venv.join("bin").join("python3");
    installed(&venv, tool, &[python], || {
        let python = std::env::var_os("QFLOW_PYTHON").unwrap_or_else(|| "python3".into());
        run(
            "python3 -m venv (install python3 and python3-venv)",
            Command::new(&python).arg("-m").arg("venv").arg(&venv),
        )?;
        run(
            "pip install componentize-py",
            Command::new(venv.join("bin").join("pip"))
                .args(["install", "--quiet", "--disable-pip-version-check"])
                .arg(format!("componentize-py=={COMPONENTIZE_PY}")),
        )
    })
}

/// componentize-js in an npm prefix of its own, made on first use.
fn componentize_js(toolchains: &Path) -> Result<PathBuf, Error> {
    let (prefix, tool) = js_paths(toolchains);
    installed(&prefix, tool, &[], || {
        std::fs::create_dir_all(&prefix).map_err(io(&prefix))?;
        write(&prefix.join("package.json"), JS_PACKAGE)?;
        write(&prefix.join("package-lock.json"), JS_LOCK)?;
        // `npm ci`: exactly the lock's tree, or a failure.
        run(
            "npm ci (componentize-js; install Node.js 20 and npm)",
            Command::new("npm")
                .args(["ci", "--silent", "--no-audit", "--no-fund", "--prefix"])
                .arg(&prefix),
        )
    })
}

/// A scratch directory for one build, removed when dropped, and the
/// build's unique tag (process and count).
struct Scratch(PathBuf, String);

impl Scratch {
    fn new(base: &Path, name: &str) -> Result<Scratch, Error> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = base.join("builds").join(format!("{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Scratch(dir, format!("{}-{n}", std::process::id())))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn write(path: &Path, text: &str) -> Result<(), Error> {
    std::fs::write(path, text).map_err(io(path))
}

/// Builds the Python project at `path` into `out_dir/NAME.wasm`.
pub(crate) fn build_python(
    path: &Path,
    out_dir: &Path,
    toolchains_dir: Option<&Path>,
) -> Result<Built, Error> {
    let path = &absolute(path)?;
    let name = project_name(path, Lang::Python)?;
    let module = python_module(path)?;
    let toolchains = toolchains(toolchains_dir);
    let tool = componentize_py(&toolchains)?;
    let scratch = Scratch::new(&toolchains, &name)?;
    let (wit, sdk) = (scratch.0.join("wit"), scratch.0.join("sdk").join("qflow_sdk"));
    std::fs::create_dir_all(&wit).map_err(io(&wit))?;
    std::fs::create_dir_all(&sdk).map_err(io(&sdk))?;
    write(&wit.join("qflow.wit"), WIT)?;
    write(&sdk.join("__init__.py"), PYTHON_SDK)?;
    let entry = format!(
        "# Written by qflow build: the component's entry.\nimport qflow_sdk\nqflow_sdk._project = {name:?}\nimport {}\nimport {module}\nfrom qflow_sdk import WitWorld\n",
        LAZY_STDLIB.join(", ")
    );
    write(&scratch.0.join("qflow_entry.py"), &entry)?;
    let built = scratch.0.join(format!("{name}.wasm"));
    run(
        "componentize-py",
        Command::new(&tool)
            .arg("-d")
            .arg(&wit)
            .args(["-w", "step", "componentize", "qflow_entry", "-p"])
            .arg(&scratch.0)
            .arg("-p")
            .arg(path)
            .arg("-p")
            .arg(scratch.0.join("sdk"))
            .arg("-o")
            .arg(&built),
    )?;
    finish(&built, out_dir, name)
}

/// The step's module: `[tool.qflow] module = "…"` in `pyproject.toml`, else `app`.
fn python_module(path: &Path) -> Result<String, Error> {
    let named = string_at(&pyproject(path)?, &["tool", "qflow", "module"]);
    let module = named.unwrap_or_else(|| "app".to_owned());
    let file = path.join(format!("{}.py", module.replace('.', "/")));
    if file.is_file() || path.join(module.replace('.', "/")).join("__init__.py").is_file() {
        Ok(module)
    } else {
        Err(Error::Project(format!(
            "{}: no module `{module}` ({} is missing; set [tool.qflow] module = \"…\" in pyproject.toml)",
            path.display(),
            file.display()
        )))
    }
}

/// Builds the JavaScript project at `path` into `out_dir/NAME.wasm`.
pub(crate) fn build_js(
    path: &Path,
    out_dir: &Path,
    toolchains_dir: Option<&Path>,
) -> Result<Built, Error> {
    let path = &absolute(path)?;
    let name = project_name(path, Lang::JavaScript)?;
    let main = package_field(path, "main").unwrap_or_else(|| "app.js".to_owned());
    if !path.join(&main).is_file() {
        return Err(Error::Project(format!(
            "{}: no {main} (package.json's `main`, app.js by default)",
            path.display()
        )));
    }
    let toolchains = toolchains(toolchains_dir);
    let tool = componentize_js(&toolchains)?;
    let scratch = Scratch::new(&toolchains, &name)?;
    write(&scratch.0.join("qflow.wit"), WIT)?;
    // The SDK beside the step, where its `import … from "./qflow-sdk.js"`
    // finds it: always this qflow's, never a stale copy; replaced by a
    // rename, so a build reading it at the same time sees it whole.
    let sdk = path.join("qflow-sdk.js");
    if std::fs::read_to_string(&sdk).ok().as_deref() != Some(JS_SDK) {
        let tmp = path.join(format!(".qflow-sdk.{}.tmp", scratch.1));
        write(&tmp, JS_SDK)?;
        std::fs::rename(&tmp, &sdk).map_err(io(&sdk))?;
    }
    // An entry of this build's own: another build of the project at the
    // same time has its own.
    let entry_name = format!(".qflow-entry-{}.js", scratch.1);
    let entry_file = path.join(&entry_name);
    let main = main.trim_start_matches("./");
    let entry = format!(
        "// Written by qflow build: the component's entry.\nimport {{ world }} from \"./qflow-sdk.js\";\nimport {{ step }} from \"./{main}\";\nconst exports = world(step, {name:?});\nexport function describe() {{ return exports.describe(); }}\nexport function init(config) {{ return exports.init(config); }}\nexport function run(input) {{ return exports.run(input); }}\n"
    );
    write(&entry_file, &entry)?;
    let built = scratch.0.join(format!("{name}.wasm"));
    let ran = run(
        "componentize-js",
        Command::new(&tool)
            .arg(&entry_name)
            .arg("--wit")
            .arg(scratch.0.join("qflow.wit"))
            .args(["--world-name", "step", "-o"])
            .arg(&built)
            .current_dir(path),
    );
    let _ = std::fs::remove_file(&entry_file);
    ran?;
    finish(&built, out_dir, name)
}

fn finish(built: &Path, out_dir: &Path, name: String) -> Result<Built, Error> {
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let dest = out_dir.join(format!("{name}.wasm"));
    place(built, &dest)?;
    Ok(Built { name, path: dest })
}

/// What `qflow doctor` reports for one tool.
#[derive(Debug, Clone)]
pub struct Check {
    /// The tool.
    pub tool: String,
    /// Whether it is there.
    pub ok: bool,
    /// Its version, or how to get it.
    pub detail: String,
}

/// Whether the tools the Python and JavaScript builds need are here.
pub fn doctor(toolchains_dir: Option<&Path>) -> Vec<Check> {
    let version = |program: &str, arg: &str| {
        Command::new(program).arg(arg).output().ok().filter(|o| o.status.success()).map(|o| {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            String::from_utf8_lossy(&text).trim().to_owned()
        })
    };
    let toolchains = toolchains(toolchains_dir);
    let installed = |(_, path): (PathBuf, PathBuf), pinned: &str| {
        if path.is_file() {
            format!("{pinned}, installed in {}", path.display())
        } else {
            format!("{pinned}, installed by the first build into {}", toolchains.display())
        }
    };
    let (cargo, python, node, npm) = (
        version("cargo", "--version"),
        version("python3", "--version"),
        version("node", "--version"),
        version("npm", "--version"),
    );
    let node_ok = node.as_deref().is_some_and(|v| {
        v.trim_start_matches('v')
            .split('.')
            .next()
            .and_then(|m| m.parse::<u32>().ok())
            .is_some_and(|m| m >= 20)
    });
    vec![
        Check {
            tool: "cargo (Rust steps)".into(),
            ok: cargo.is_some(),
            detail: cargo.unwrap_or_else(|| "install rustup: https://rustup.rs".into()),
        },
        Check {
            tool: "python3 with venv (Python steps)".into(),
            ok: python.is_some(),
            detail: python.unwrap_or_else(|| "apt-get install python3 python3-venv".into()),
        },
        Check {
            tool: "componentize-py".into(),
            ok: true,
            detail: installed(py_paths(&toolchains), COMPONENTIZE_PY),
        },
        Check {
            tool: "node ≥ 20 and npm (JavaScript steps)".into(),
            ok: node_ok && npm.is_some(),
            detail: match node {
                Some(v) => format!("node {v}, npm {}", npm.unwrap_or_else(|| "missing".into())),
                None => "install Node.js 20 and npm".into(),
            },
        },
        Check {
            tool: "componentize-js".into(),
            ok: true,
            detail: installed(js_paths(&toolchains), COMPONENTIZE_JS),
        },
    ]
}
