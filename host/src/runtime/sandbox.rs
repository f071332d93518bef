//! What a plugin may touch and use: the capabilities the operator grants
//! (directories, environment variables), the limits on its memory and
//! tables, and the capture of everything it prints.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder, WasiView};

use super::engine::Engine;
use super::memory::{MemoryBudget, Refused, Reservation};
use crate::model::{Database, HttpGrant, Mount, StepLog};

/// What the operator grants one step or loader: nothing else is there.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub(crate) struct Grants {
    pub(crate) dirs: Vec<Mount>,
    pub(crate) env: Vec<(String, String)>,
    /// The origins its HTTP requests may reach.
    pub(crate) http: Arc<[HttpGrant]>,
    /// The databases it may query.
    pub(crate) databases: Arc<[Database]>,
}

/// Grants made ready for one instance: its WASI context, its HTTP and
/// database grants.
pub(crate) struct Granted {
    pub(crate) wasi: WasiCtxBuilder,
    pub(crate) http: Arc<[HttpGrant]>,
    pub(crate) databases: Arc<[Database]>,
}

impl Grants {
    /// What one instance gets: [`Grants::wasi`], the HTTP and database grants.
    pub(crate) fn granted(&self) -> Result<Granted, String> {
        let (http, databases) = (self.http.clone(), self.databases.clone());
        Ok(Granted { wasi: self.wasi()?, http, databases })
    }

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

/// The WASI interface whose `symlink-at` the sandbox replaces. It must be
/// exactly the version wasmtime-wasi defines (a guest importing any 0.2.x
/// is matched to it); [`guard_symlinks`] fails loudly if it is not.
const FILESYSTEM_TYPES: &str = "wasi:filesystem/types@0.2.12";
const SYMLINK_AT: &str = "[method]descriptor.symlink-at";

/// Replaces WASI's `symlink-at` with one that refuses a link whose target
/// climbs above the link's own directory. wasmtime-wasi already refuses
/// absolute targets, and a guest can never follow a link out of its grant;
/// but the operator's own tools, reading a writable grant after the run,
/// would. A target like `sub/../x` stays below the link and is allowed.
pub(crate) fn guard_symlinks<T: WasiView + 'static>(
    linker: &mut wasmtime::component::Linker<T>,
) -> wasmtime::Result<()> {
    use wasmtime::component::Resource;
    use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemView};
    use wasmtime_wasi::p2::bindings::filesystem::types::{ErrorCode, HostDescriptor};

    // Were the name wrong, defining it without shadowing would succeed and
    // guests would keep the original: make sure it is there to replace.
    let mut probe = linker.clone();
    probe.allow_shadowing(false);
    let defined = probe
        .instance(FILESYSTEM_TYPES)?
        .func_wrap(SYMLINK_AT, |_, (): ()| Ok::<(), wasmtime::Error>(()))
        .is_err();
    wasmtime::ensure!(defined, "{FILESYSTEM_TYPES} has no {SYMLINK_AT} to guard");

    linker.allow_shadowing(true);
    linker.instance(FILESYSTEM_TYPES)?.func_wrap_async(
        SYMLINK_AT,
        |mut store: wasmtime::StoreContextMut<'_, T>,
         (fd, target, link): (Resource<Descriptor>, String, String)| {
            Box::new(async move {
                if escapes(&target) {
                    return Ok((Err(ErrorCode::NotPermitted),));
                }
                let mut view = store.data_mut().filesystem();
                match HostDescriptor::symlink_at(&mut view, fd, target, link).await {
                    Ok(()) => Ok((Ok(()),)),
                    // Not a WASI error code: a trap, as the generated code does.
                    Err(e) => Ok((Err(e.downcast()?),)),
                }
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Whether a symlink target, read from the link's own directory, leads
/// above it (or is absolute).
fn escapes(target: &str) -> bool {
    let mut depth = 0usize;
    for part in std::path::Path::new(target).components() {
        match part {
            std::path::Component::Normal(_) => depth += 1,
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => match depth.checked_sub(1) {
                Some(up) => depth = up,
                None => return true,
            },
            std::path::Component::RootDir | std::path::Component::Prefix(_) => return true,
        }
    }
    false
}

/// How many instances, tables and memories one component may create: a
/// Rust component built for wasm32-wasip2 needs a handful of each.
const MAX_INSTANCES: usize = 32;
const MAX_TABLES: usize = 32;
const MAX_MEMORIES: usize = 4;
/// Elements per table: far beyond any real plugin's function table.
const MAX_TABLE_ELEMENTS: usize = 1 << 20;

/// The store's resource limiter: denies growth past the instance's limits,
/// reserves what it grows from the host-wide memory budget (waiting for it
/// when others hold it), and remembers what it denied so that the failure
/// can say why.
pub(crate) struct Limiter {
    memory: usize,
    /// What was denied, if anything.
    pub(crate) hit: Option<String>,
    engine: Engine,
    /// The part of the host-wide budget this instance holds; given back
    /// when the instance is dropped.
    reserved: Reservation,
    /// Set while a spare is being made: it takes only memory that is free
    /// now, never waiting for it nor pushing idle instances out.
    pub(crate) spare: bool,
}

impl Limiter {
    pub(crate) fn new(memory: usize, engine: Engine) -> Limiter {
        let reserved = engine.memory().reservation();
        Limiter { memory, hit: None, engine, reserved, spare: false }
    }
}

#[wasmtime_wasi::async_trait]
impl wasmtime::ResourceLimiterAsync for Limiter {
    /// Called for each memory's initial size at instantiation (as growth
    /// from 0) and for every `memory.grow` after.
    async fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.memory {
            self.hit = Some(format!("its memory limit of {} MiB", self.memory >> 20));
            return Ok(false);
        }
        let more = MemoryBudget::pages(desired).saturating_sub(MemoryBudget::pages(current));
        if more == 0 {
            return Ok(true);
        }
        let engine = &self.engine;
        match self.reserved.grow(more, self.spare, || engine.evict_idle()).await {
            Ok(()) => Ok(true),
            Err(refused) => {
                let budget = engine.memory().limit_bytes() >> 20;
                self.hit = Some(match refused {
                    Refused::TooLarge => format!("the host's memory budget of {budget} MiB"),
                    Refused::Deadlock => format!(
                        "the host's memory budget of {budget} MiB, held by instances that all wait for more"
                    ),
                    Refused::Spare => format!(
                        "the host's memory budget of {budget} MiB (a spare waits for no memory)"
                    ),
                });
                Ok(false)
            }
        }
    }

    async fn table_growing(
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

/// What one kept line costs the budget beyond its text: what the host
/// spends to hold it (a `String` and its stream, 40 bytes, in a vector that
/// may be up to twice as large as it is full), so that a flood of empty
/// lines is bounded like a flood of long ones.
pub(crate) const RECORD_OVERHEAD: usize = 80;

/// Output not yet ended by a newline: raw bytes, since a UTF-8 character
/// may span two writes.
#[derive(Default)]
struct Partial {
    bytes: Vec<u8>,
    /// The budget ran out in this line: the rest of it is dropped.
    cut: bool,
}

#[derive(Default)]
struct Buffer {
    lines: Vec<(Stream, String)>,
    stdout: Partial,
    stderr: Partial,
    /// Budget spent by kept lines, each with its overhead.
    kept: usize,
    limit: usize,
    /// Bytes written over the budget and dropped (a dropped line's break
    /// included), and the lines dropped whole.
    dropped: u64,
    dropped_lines: u64,
}

impl Buffer {
    /// What is left of the budget: kept lines and the memory held for
    /// unfinished ones count.
    fn room(&self) -> usize {
        let partials = self.stdout.bytes.capacity() + self.stderr.bytes.capacity();
        self.limit.saturating_sub(self.kept + partials)
    }

    fn partial(&mut self, stream: Stream) -> &mut Partial {
        match stream {
            Stream::Stderr => &mut self.stderr,
            _ => &mut self.stdout,
        }
    }

    /// Keeps a whole line (without its line break) if it fits, as the text
    /// it will be stored as, with its overhead; counts it dropped otherwise.
    /// Nothing is allocated for a line that is dropped.
    fn push(&mut self, stream: Stream, line: &[u8], line_break: bool) -> Option<&str> {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        // Invalid UTF-8 is stored as U+FFFD, three bytes a byte: that counts.
        let text = String::from_utf8_lossy(line);
        if text.len() + RECORD_OVERHEAD > self.room() {
            self.dropped += line.len() as u64 + u64::from(line_break);
            self.dropped_lines += 1;
            return None;
        }
        self.kept += text.len() + RECORD_OVERHEAD;
        self.lines.push((stream, text.into_owned()));
        self.lines.last().map(|(_, line)| line.as_str())
    }

    /// Guest output: one pass over the bytes, whatever their line breaks.
    fn write(&mut self, stream: Stream, mut bytes: &[u8]) {
        while let Some(at) = bytes.iter().position(|&b| b == b'\n') {
            self.append(stream, &bytes[..at]);
            self.end_line(stream, true);
            bytes = &bytes[at + 1..];
        }
        self.append(stream, bytes);
    }

    /// Adds to the stream's unfinished line, as far as the budget goes (the
    /// line's overhead is kept free for when it ends). The buffer grows in
    /// doublings while they fit the budget, then exactly.
    fn append(&mut self, stream: Stream, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let room = self.room().saturating_sub(RECORD_OVERHEAD);
        let partial = self.partial(stream);
        let spare = partial.bytes.capacity() - partial.bytes.len();
        let fits = if partial.cut { 0 } else { bytes.len().min(spare + room) };
        if fits > spare {
            let doubled = partial.bytes.capacity().max(64);
            partial.bytes.reserve_exact(if doubled <= room { doubled.max(fits) } else { fits });
        }
        partial.bytes.extend_from_slice(&bytes[..fits]);
        if fits < bytes.len() {
            partial.cut = true;
            self.dropped += (bytes.len() - fits) as u64;
        }
    }

    fn end_line(&mut self, stream: Stream, line_break: bool) {
        let partial = std::mem::take(self.partial(stream));
        self.push(stream, &partial.bytes, line_break);
    }

    /// Ends what is unfinished: a call's output ends with the call.
    fn flush_partials(&mut self) {
        for stream in [Stream::Stdout, Stream::Stderr] {
            if self.partial(stream).bytes.is_empty() {
                *self.partial(stream) = Partial::default();
            } else {
                self.end_line(stream, false);
            }
        }
    }
}

/// What a call printed: stdout, stderr and `host.log`, in order, up to a
/// byte budget that also bounds the capture's own memory; what is over the
/// budget is counted and dropped, never an error the guest sees (a Rust
/// guest panics when printing fails).
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

    /// Keeps one `host.log` line, if the budget allows; `forward` sees it
    /// only then, so that what reaches the operator's log obeys the same
    /// budget as the step's report.
    pub(crate) fn line(&self, stream: Stream, line: &str, forward: impl FnOnce(&str)) {
        if let Some(kept) = self.lock().push(stream, line.as_bytes(), false) {
            forward(kept);
        }
    }

    /// Takes what was captured so far, leaving the log empty for the next call.
    pub(crate) fn take(&self) -> StepLog {
        let mut buffer = self.lock();
        buffer.flush_partials();
        let lines =
            buffer.lines.drain(..).map(|(s, line)| format!("{}: {line}", s.label())).collect();
        let log = StepLog {
            lines,
            dropped: std::mem::take(&mut buffer.dropped),
            dropped_lines: std::mem::take(&mut buffer.dropped_lines),
        };
        buffer.kept = 0;
        log
    }

    /// The last lines written to stderr, on one line (a Rust panic message
    /// lands there); empty when there are none.
    pub(crate) fn stderr_tail(&self) -> String {
        let buffer = self.lock();
        let partial = String::from_utf8_lossy(&buffer.stderr.bytes);
        let mut tail: Vec<&str> = buffer
            .lines
            .iter()
            .filter(|(s, _)| *s == Stream::Stderr)
            .map(|(_, l)| l.trim())
            .filter(|l| !l.is_empty() && !l.starts_with("note: run with `RUST_BACKTRACE"))
            .collect();
        if !partial.trim().is_empty() {
            tail.push(partial.trim());
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

    fn write(log: &Log, stream: Stream, bytes: &[u8]) {
        log.lock().write(stream, bytes);
    }

    #[test]
    fn lines_are_kept_in_order_up_to_the_budget() {
        let log = Log::new(4 * RECORD_OVERHEAD + 84);
        write(&log, Stream::Stdout, b"one\ntw");
        log.line(Stream::Log("info"), "hello", |_| {});
        write(&log, Stream::Stderr, b"oops\r\n");
        write(&log, Stream::Stdout, b"o\nthis line is too long\n");
        let captured = log.take();
        assert_eq!(captured.lines, ["stdout: one", "info: hello", "stderr: oops", "stdout: two"]);
        assert_eq!(captured.dropped, "this line is too long\n".len() as u64);
        assert_eq!(captured.dropped_lines, 1);
        assert_eq!(log.take(), StepLog::default());
    }

    #[test]
    fn empty_lines_cost_their_overhead_and_the_capture_stays_within_its_budget() {
        let budget = 64 << 10;
        let log = Log::new(budget);
        // Ten million empty lines, in the 64 KiB writes a guest makes.
        let chunk = vec![b'\n'; 64 << 10];
        for _ in 0..(10_000_000 / chunk.len()) {
            write(&log, Stream::Stdout, &chunk);
        }
        let kept = budget / RECORD_OVERHEAD;
        {
            let buffer = log.lock();
            assert_eq!(buffer.lines.len(), kept);
            assert!(buffer.kept <= budget);
        }
        let captured = log.take();
        let written = (10_000_000 / chunk.len() * chunk.len()) as u64;
        assert_eq!(captured.dropped, written - kept as u64);
        assert_eq!(captured.dropped_lines, written - kept as u64);
    }

    #[test]
    fn a_line_that_never_ends_is_cut_at_the_budget() {
        let log = Log::new(1000);
        for _ in 0..100 {
            write(&log, Stream::Stderr, &[b'x'; 100]);
        }
        assert!(log.lock().room() >= RECORD_OVERHEAD);
        let captured = log.take();
        assert_eq!(captured.lines.len(), 1);
        assert_eq!(captured.lines[0].len(), "stderr: ".len() + 1000 - RECORD_OVERHEAD);
        assert_eq!(captured.dropped, 10_000 - (1000 - RECORD_OVERHEAD) as u64);
    }

    #[test]
    fn only_kept_log_lines_are_forwarded() {
        let log = Log::new(2 * RECORD_OVERHEAD + 10);
        let mut forwarded = Vec::new();
        for n in 0..1000 {
            log.line(Stream::Log("error"), &format!("e{n}"), |line| {
                forwarded.push(line.to_owned())
            });
        }
        assert_eq!(forwarded, ["e0", "e1"]);
        assert_eq!(log.take().dropped_lines, 998);
    }

    #[test]
    fn a_character_split_across_writes_is_kept_whole() {
        let log = Log::new(1000);
        let text = "é\n".as_bytes();
        write(&log, Stream::Stdout, &text[..1]);
        write(&log, Stream::Stdout, &text[1..]);
        assert_eq!(log.take().lines, ["stdout: é"]);
    }

    #[test]
    fn symlink_targets_that_climb_out_of_their_directory_are_refused() {
        for target in ["../../../../etc/passwd", "..", "a/../../b", "/etc/passwd"] {
            assert!(escapes(target), "{target}");
        }
        for target in ["x", "sub/../x", "./a/b", "a/b/../../c"] {
            assert!(!escapes(target), "{target}");
        }
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
