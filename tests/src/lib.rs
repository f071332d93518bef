//! What Qflow's end-to-end tests share: the repository, the bundled and the
//! hostile plugins built for real (once per test process, into the target
//! directory; cargo rebuilds only what changed), and the `qflow` binary.
#![allow(clippy::panic)]

use std::io::{BufRead, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;

mod http;
mod postgres;

pub use self::http::HttpServer;
pub use self::postgres::{Postgres, postgres_url};

/// The repository's root.
pub fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The target directory the running test was built into: its executable
/// lives in `<target>/<profile>/deps/`.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("no current executable: {e}"));
    let deps = exe.parent().unwrap_or_else(|| panic!("{} has no directory", exe.display()));
    let profile = deps.parent().unwrap_or(deps);
    profile.parent().unwrap_or(profile).to_path_buf()
}

/// A directory of the tests' own under the target directory.
pub fn scratch(name: &str) -> PathBuf {
    let dir = target_dir().join("qflow-tests").join(name);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        panic!("cannot create {}: {e}", dir.display());
    }
    dir
}

/// Builds a plugin workspace into `out`, emptied first so that no component
/// of an earlier version of the repository lingers there.
fn build(workspace: &str, out: &Path) {
    let _ = std::fs::remove_dir_all(out);
    let options = qflow_plugin_build::Options::default();
    if let Err(e) = qflow_plugin_build::build(&repo().join(workspace), out, &options) {
        panic!("building {workspace} failed: {e}");
    }
}

/// A plugins directory holding every bundled plugin, built from `plugins/`
/// on first use.
pub fn plugins_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = scratch("plugins");
        build("plugins", &out);
        out
    })
}

/// The bundled plugins plus the hostile ones from `plugins/hostile`.
pub fn hostile_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // One plugin build at a time: they share the machine's cores and,
        // on a fresh machine, the first one installs the wasm target.
        let bundled = plugins_dir();
        let out = scratch("hostile-plugins");
        build("plugins/hostile", &out);
        let entries = std::fs::read_dir(bundled)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", bundled.display()));
        for entry in entries.flatten() {
            let path = entry.path();
            if let Some(name) = path.file_name()
                && let Err(e) = std::fs::copy(&path, out.join(name))
            {
                panic!("cannot copy {}: {e}", path.display());
            }
        }
        out
    })
}

/// The `qflow` binary of this build. `cargo test --workspace` has built it
/// already, with the tests' own features (the command line has tests of its
/// own), into the same target directory and profile: that one is used when
/// it is newer than every source it is made from. Otherwise (`cargo test -p
/// qflow-tests` after a change) cargo builds it on first use.
pub fn qflow_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().unwrap_or_else(|e| panic!("no current executable: {e}"));
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .unwrap_or_else(|| panic!("{} is not in <target>/<profile>/deps", exe.display()));
        let bin = profile_dir.join(format!("qflow{}", std::env::consts::EXE_SUFFIX));
        if built_after_its_sources(&bin) {
            return bin;
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "--quiet", "-p", "qflow-cli", "--bin", "qflow"]);
        build.arg("--target-dir").arg(target_dir()).current_dir(repo());
        if profile_dir.file_name().is_some_and(|p| p == "release") {
            build.arg("--release");
        }
        let status = build.status().unwrap_or_else(|e| panic!("cannot run cargo: {e}"));
        assert!(status.success(), "building the qflow binary failed");
        assert!(bin.is_file(), "cargo built no {}", bin.display());
        bin
    })
}

/// Whether `bin` exists and no source of the binary changed after it was
/// built: the crates it links, the contract, the SDKs it compiles in, the
/// lock file.
fn built_after_its_sources(bin: &Path) -> bool {
    fn newest(path: &Path) -> Option<std::time::SystemTime> {
        let meta = std::fs::metadata(path).ok()?;
        if !meta.is_dir() {
            return meta.modified().ok();
        }
        let entries = std::fs::read_dir(path).ok()?;
        entries.flatten().filter_map(|e| newest(&e.path())).max()
    }
    let Some(built) = std::fs::metadata(bin).and_then(|m| m.modified()).ok() else {
        return false;
    };
    let sources = ["cli/src", "cli/Cargo.toml", "host/src", "host/migrations", "host/Cargo.toml"];
    let sources = sources.iter().map(|s| repo().join(s));
    sources
        .chain(
            [
                "server/src",
                "server/dashboard",
                "server/Cargo.toml",
                "wit",
                "plugin-build/src",
                "plugin-build/toolchain",
                // The SDKs `qflow build` compiles in.
                "plugins/sdk-python",
                "plugins/sdk-js",
                "Cargo.lock",
            ]
            .map(|s| repo().join(s)),
        )
        .filter_map(|path| newest(&path))
        .all(|modified| modified <= built)
}

/// A `qflow serve` of this build on a loopback port of its own; killed
/// when dropped.
pub struct Server {
    /// The process.
    pub child: Child,
    /// Its base URL, such as `http://127.0.0.1:41234`.
    pub url: String,
}

impl Server {
    /// Serves the flows of `flows`, keeping runs in `data`, on `plugins`.
    pub fn start(data: &Path, flows: &Path, plugins: &Path) -> Server {
        let mut child = Command::new(qflow_bin())
            .args(["serve", "--addr", "127.0.0.1:0", "--flows"])
            .arg(flows)
            .env("QFLOW_PLUGINS", plugins)
            .env("QFLOW_DATA_DIR", data)
            .env("QFLOW_CACHE_DIR", scratch("serve-cache"))
            .env("QFLOW_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start qflow serve: {e}"));
        let stderr = child.stderr.take().unwrap_or_else(|| panic!("no stderr"));
        let lines = lines(stderr);
        let line = wait_for(&lines, "qflow serving on ");
        let url = line.rsplit("serving on ").next().unwrap_or_default().trim().to_owned();
        // Whatever else it says goes on being read, so it never blocks.
        std::thread::spawn(move || for _ in lines {});
        Server { child, url }
    }

    /// One request to this server: see [`http`].
    pub fn http(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        http(&self.url, method, path, body)
    }

    /// Kills the process (SIGKILL) and waits for it.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The lines a child writes to a pipe, as they come.
pub fn lines(pipe: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits (up to a generous minute) for a line that contains `text`.
pub fn wait_for(lines: &mpsc::Receiver<String>, text: &str) -> String {
    loop {
        match lines.recv_timeout(Duration::from_secs(60)) {
            Ok(line) if line.contains(text) => return line,
            Ok(_) => {}
            Err(e) => panic!("no line with {text:?}: {e}"),
        }
    }
}

/// One HTTP/1.1 request on its own connection, the whole answer read: the
/// status and the JSON body (`null` if it is not JSON).
pub fn http(base: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let host = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(host)
        .unwrap_or_else(|e| panic!("cannot connect to {host}: {e}"));
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap_or_else(|e| panic!("cannot send: {e}"));
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap_or_else(|e| panic!("cannot read the answer: {e}"));
    let answer = String::from_utf8_lossy(&answer);
    let status: u16 = answer.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, text) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    // A chunked body: the chunks' sizes are lines of their own.
    let text: String = if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        text.split("\r\n").enumerate().filter(|(n, _)| n % 2 == 1).map(|(_, c)| c).collect()
    } else {
        text.to_owned()
    };
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}
