//! Real PostgreSQL servers for the tests: the one CI started (its URL in
//! `QFLOW_TEST_POSTGRES_URL`), or a throwaway cluster of the test's own,
//! on loopback, made with Debian's `initdb` and `pg_ctl` and removed when
//! it is dropped.

use std::path::PathBuf;
use std::process::{Command, Stdio};

/// Where Debian puts a PostgreSQL version's programs.
const DEBIAN_BIN: &str = "/usr/lib/postgresql";

/// A throwaway PostgreSQL cluster on a loopback port.
pub struct Postgres {
    /// `postgres://qflow@127.0.0.1:PORT/postgres`.
    pub url: String,
    bin: PathBuf,
    dir: tempfile::TempDir,
    /// `runuser -u postgres --` when running as root (PostgreSQL refuses
    /// to run as root).
    as_user: Vec<String>,
}

/// Whether PostgreSQL tests may be skipped here: not when CI says it
/// installed PostgreSQL (`QFLOW_REQUIRE_POSTGRES=1`).
fn skip(why: &str) -> Option<Postgres> {
    if std::env::var("QFLOW_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
        panic!("PostgreSQL is required here (QFLOW_REQUIRE_POSTGRES=1), but {why}");
    }
    eprintln!("skipping: {why}");
    None
}

/// The URL of a PostgreSQL database for tests that only query: CI's
/// server, else a cluster of the test's own (kept alive by the returned
/// guard). `None` (the test skips) where PostgreSQL is not installed.
pub fn postgres_url() -> Option<(String, Option<Postgres>)> {
    match std::env::var("QFLOW_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some((url, None)),
        _ => Postgres::start().map(|pg| (pg.url.clone(), Some(pg))),
    }
}

impl Postgres {
    /// Makes and starts a cluster of its own; `None` where PostgreSQL's
    /// programs are not installed.
    pub fn start() -> Option<Postgres> {
        let Some(bin) = find_bin() else {
            return skip(&format!("no PostgreSQL under {DEBIAN_BIN} (apt-get install postgresql)"));
        };
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("no temporary directory: {e}"));
        let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout == b"0\n");
        let as_user: Vec<String> = if root {
            run(Command::new("chown").arg("-R").arg("postgres").arg(dir.path()));
            ["runuser", "-u", "postgres", "--"].map(String::from).to_vec()
        } else {
            Vec::new()
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or_else(|e| panic!("no free port: {e}"));
        let pg = Postgres {
            url: format!("postgres://qflow@127.0.0.1:{port}/postgres"),
            bin,
            dir,
            as_user,
        };
        let data = pg.data();
        run(pg
            .command("initdb")
            .args(["-A", "trust", "-U", "qflow", "-E", "UTF8", "--no-sync", "-D"])
            .arg(&data));
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            pg.dir.path().display()
        );
        run(pg
            .command("pg_ctl")
            .arg("-D")
            .arg(&data)
            .args(["-o", &options, "-l"])
            .arg(pg.log())
            .args(["-w", "start"]));
        Some(pg)
    }

    /// Restarts the server (`pg_ctl restart -m fast`): every connection to
    /// it is cut, and it listens again on the same port.
    pub fn restart(&self) {
        // The server's output goes to the log, or it would hold our pipe open.
        let mut restart = self.command("pg_ctl");
        restart.arg("-D").arg(self.data()).arg("-l").arg(self.log());
        run(restart.args(["-m", "fast", "-w", "restart"]));
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        let mut command = match self.as_user.split_first() {
            Some((first, rest)) => {
                let mut command = Command::new(first);
                command.args(rest).arg(&path);
                command
            }
            None => Command::new(&path),
        };
        command.stdin(Stdio::null());
        command
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut stop = self.command("pg_ctl");
        stop.arg("-D").arg(self.data()).args(["-m", "immediate", "-w", "stop"]);
        let _ = stop.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

/// The newest `/usr/lib/postgresql/VERSION/bin`.
fn find_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(DEBIAN_BIN)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

fn run(command: &mut Command) {
    let output = command.output().unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    if !output.status.success() {
        panic!(
            "{command:?} failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
