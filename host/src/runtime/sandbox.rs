//! What a plugin may touch and use: the capabilities the operator grants
//! (directories, environment variables), the limits on its memory and
//! tables, and the capture of everything it prints.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use crate::model::{Mount, StepLog};

/// What the operator grants one step or loader: nothing else is there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct Grants {
    pub(crate) dirs: Vec<Mount>,
    pub(crate) env: Vec<(String, String)>,
}

impl Grants {
    /// A WASI context with exactly these grants: the directories preopened
    /// (read-only unless granted writable), the variables set, no network,
    /// no inherited environment, no arguments, stdin closed.
    pub(crate) fn wasi(&self) -> Result<WasiCtxBuilder, String> {
        let mut wasi = WasiCtxBuilder::new();
        for mount in &self.dirs {
            let perms = if mount.writable { FsPerms::ReadWrite } else { FsPerms::ReadOnly };
            wasi.preopened_dir(&mount.host, &mount.guest, perms).map_err(|e| {
                format!("cannot grant {} as {}: {e}", mount.host.display(), mount.guest)
            })?;
        }
        wasi.envs(&self.env);
        Ok(wasi)
    }
}

/// How many instances, tables and memories one component may create: a
/// Rust component built for wasm32-wasip2 needs a handful of each.
const MAX_INSTANCES: usize = 32;
const MAX_TABLES: usize = 32;
const MAX_MEMORIES: usize = 4;
/// Elements per table: far beyond any real plugin's function table.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// The store's resource limiter: denies growth past the limits, and
/// remembers that it did so that the failure can say why.
pub(crate) struct Limiter {
    memory: usize,
    /// What was denied, if anything.
    pub(crate) hit: Option<String>,
}

impl Limiter {
    pub(crate) fn new(memory: usize) -> Limiter {
        Limiter { memory, hit: None }
    }
}

impl wasmtime::ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            self.hit = Some(format!("its memory limit of {} MiB", self.memory >> 20));
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > MAX_TABLE_ELEMENTS {
            self.hit = Some(format!("its table limit of {MAX_TABLE_ELEMENTS} elements"));
            return Ok(false);
        }
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// Which output a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
    /// `host.log`, with its level.
    Log(&'static str),
}

impl Stream {
    fn label(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
            Stream::Log(level) => level,
        }
    }
}

#[derive(Default)]
struct Buffer {
    lines: Vec<(Stream, String)>,
    /// Output not yet ended by a newline, per stream.
    stdout: String,
    stderr: String,
    bytes: usize,
    limit: usize,
    dropped: u64,
}

impl Buffer {
    fn push(&mut self, stream: Stream, line: String) {
        if self.bytes + line.len() > self.limit {
            self.dropped += line.len() as u64;
            return;
        }
        self.bytes += line.len();
        self.lines.push((stream, line));
    }

    fn write(&mut self, stream: Stream, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let limit = self.limit;
        let partial = match stream {
            Stream::Stderr => &mut self.stderr,
            _ => &mut self.stdout,
        };
        partial.push_str(&text);
        let mut complete = Vec::new();
        while let Some(end) = partial.find('\n') {
            complete.push(partial.drain(..=end).collect::<String>());
        }
        // A line that never ends is cut at the budget, so it cannot grow
        // without bound.
        let mut cut = 0;
        if partial.len() > limit {
            let mut at = limit;
            while !partial.is_char_boundary(at) {
                at -= 1;
            }
            cut = partial.len() - at;
            partial.truncate(at);
        }
        self.dropped += cut as u64;
        for line in complete {
            self.push(stream, line.trim_end_matches(['\n', '\r']).to_owned());
        }
    }

    fn flush_partials(&mut self) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            let partial = match stream {
                Stream::Stderr => std::mem::take(&mut self.stderr),
                _ => std::mem::take(&mut self.stdout),
            };
            if !partial.is_empty() {
                self.push(stream, partial);
            }
        }
    }
}

/// What a call printed: stdout, stderr and `host.log`, in order, up to a
/// byte budget; what is over the budget is counted and dropped, never an
/// error the guest sees (a Rust guest panics when printing fails).
#[derive(Clone, Default)]
pub(crate) struct Log(Arc<Mutex<Buffer>>);

impl Log {
    pub(crate) fn new(limit: usize) -> Log {
        Log(Arc::new(Mutex::new(Buffer { limit, ..Buffer::default() })))
    }

    fn lock(&self) -> MutexGuard<'_, Buffer> {
        // Nothing panics while holding the lock; recover the data if it ever did.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn line(&self, stream: Stream, line: String) {
        self.lock().push(stream, line);
    }

    /// Takes what was captured so far, leaving the log empty for the next call.
    pub(crate) fn take(&self) -> StepLog {
        let mut buffer = self.lock();
        buffer.flush_partials();
        let lines =
            buffer.lines.drain(..).map(|(s, line)| format!("{}: {line}", s.label())).collect();
        let dropped = std::mem::take(&mut buffer.dropped);
        buffer.bytes = 0;
        StepLog { lines, dropped }
    }

    /// The last lines written to stderr, on one line (a Rust panic message
    /// lands there); empty when there are none.
    pub(crate) fn stderr_tail(&self) -> String {
        let buffer = self.lock();
        let mut tail: Vec<&str> = buffer
            .lines
            .iter()
            .filter(|(s, _)| *s == Stream::Stderr)
            .map(|(_, l)| l.trim())
            .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect();
        if !buffer.stderr.trim().is_empty() {
            tail.push(buffer.stderr.trim());
        }
        tail[tail.len().saturating_sub(5)..].join(" ")
    }

    /// A pipe for the guest's stdout or stderr into this log.
    pub(crate) fn pipe(&self, stream: Stream) -> Pipe {
        Pipe { log: self.clone(), stream }
    }
}

/// The guest's stdout or stderr.
#[derive(Clone)]
pub(crate) struct Pipe {
    log: Log,
    stream: Stream,
}

/// What a pipe tells the guest it may write at once.
const WRITE_CHUNK: usize = 64 * 1024;

#[wasmtime_wasi::async_trait]
impl OutputStream for Pipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.log.lock().write(self.stream, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(WRITE_CHUNK)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for Pipe {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for Pipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.log.lock().write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for Pipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Pipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_kept_in_order_up_to_the_budget() {
        let log = Log::new(20);
        log.pipe(Stream::Stdout).log.lock().write(Stream::Stdout, b"one\ntw");
        log.line(Stream::Log("info"), "hello".into());
        log.pipe(Stream::Stderr).log.lock().write(Stream::Stderr, b"oops\n");
        log.pipe(Stream::Stdout).log.lock().write(Stream::Stdout, b"o\nthis line is too long\n");
        let captured = log.take();
        assert_eq!(captured.lines, ["stdout: one", "info: hello", "stderr: oops", "stdout: two"]);
        assert_eq!(captured.dropped, "this line is too long".len() as u64);
        assert_eq!(log.take(), StepLog::default());
    }

    #[test]
    fn the_stderr_tail_skips_rusts_backtrace_hint() {
        let log = Log::new(1000);
        let mut buffer = log.lock();
        buffer.write(Stream::Stderr, b"panicked at x.rs:1:1:\nboom\n");
        buffer.write(Stream::Stderr, b"note: run with `RUST_BACKTRACE=1` for a backtrace\n");
        drop(buffer);
        assert_eq!(log.stderr_tail(), "panicked at x.rs:1:1: boom");
    }
}
