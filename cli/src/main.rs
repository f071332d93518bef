//! The `qflow` command line.

mod optimization;
mod runs;
mod telemetry;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use qflow::model::{Retention, RunStore, printable, printable_lines};
use qflow::store::SqliteStore;
use qflow::{
    CancellationToken, EventData, Flow, FlowLimits, Host, HostConfig, Keep, RunOptions, RunStatus,
    RunSummary, StepStatus,
};
use serde_json::Value;

#[derive(Parser)]
#[command(name = "qflow", version, about = "Runs flows of WebAssembly-component steps")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a flow to the end; exits 0 only if every step succeeded.
    Run {
        /// The flow file (TOML, or JSON if it ends in .json).
        flow: PathBuf,
        #[command(flatten)]
        host: HostArgs,
        /// The flow's input: JSON text, or @FILE to read JSON from a file.
        #[arg(long, default_value = "null")]
        input: String,
        /// At most this many steps at once (overrides the flow's `max_parallel`).
        #[arg(long)]
        max_parallel: Option<usize>,
        /// Write the run's events (CloudEvents, one JSON object a line) to this file.
        #[arg(long)]
        events: Option<PathBuf>,
        #[command(flatten)]
        outputs: OutputArgs,
        /// Print a machine-readable summary on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Show a flow's dependency analysis: order, parallel groups, critical
    /// path, resource conflicts, redundant dependencies.
    Plan {
        /// The flow file.
        flow: PathBuf,
        #[command(flatten)]
        host: HostArgs,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Watch the plugins directory and reload plugins as they change,
    /// printing what happens; with a flow, run it at the start and again
    /// whenever a plugin it uses is reloaded. Stops on Ctrl-C.
    Watch {
        /// A flow to re-run on every reload of a plugin it uses.
        flow: Option<PathBuf>,
        #[command(flatten)]
        host: HostArgs,
        /// The flow's input: JSON text, or @FILE to read JSON from a file.
        #[arg(long, default_value = "null")]
        input: String,
        /// Print events and run summaries as JSON lines on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Serve the HTTP API (flows, runs, optimization, plugins, events) and
    /// Prometheus metrics until SIGTERM or Ctrl-C; runs in flight finish.
    Serve {
        /// Where to listen. Any address but loopback requires a token.
        #[arg(long, default_value = "127.0.0.1:8080")]
        addr: std::net::SocketAddr,
        #[command(flatten)]
        host: HostArgs,
        /// A directory of flow files to serve; flows registered through
        /// the API are written there.
        #[arg(long, env = "QFLOW_FLOWS")]
        flows: Option<PathBuf>,
        /// The bearer token every request must carry.
        #[arg(long, env = "QFLOW_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// The optimization level `optimize` uses by default.
        #[arg(long, default_value = "balanced")]
        level: qflow::model::optimize::Level,
        /// How long runs in flight may take to finish at shutdown, in seconds.
        #[arg(long, default_value_t = 30)]
        grace_secs: u64,
    },
    /// The optimization service: metrics, recommendations, optimize, pools.
    Optimization {
        #[command(subcommand)]
        command: optimization::Command,
    },
    /// The runs in the run store: list, show, rerun.
    Runs {
        #[command(subcommand)]
        command: runs::Command,
    },
    /// Work with the plugins directory.
    Plugins {
        #[command(subcommand)]
        command: PluginsCommand,
    },
    /// Build a plugin project into components in the plugins directory: a
    /// Rust crate (or a workspace of them), a Python project
    /// (componentize-py) or a JavaScript one (componentize-js).
    Build {
        /// The project to build.
        #[arg(default_value = ".")]
        path: PathBuf,
        /// Where to place the components (default: the plugins directory).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Build with the dev profile instead of release (Rust).
        #[arg(long)]
        debug: bool,
        /// Where the pinned Python and JavaScript toolchains are installed,
        /// under `toolchains/` (default: the platform's cache directory).
        #[arg(long, env = "QFLOW_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
    },
    /// Write a new step project: the code, a README and a flow that runs it.
    New {
        /// The plugin's name (and its directory's).
        name: String,
        /// Its language.
        #[arg(long, value_enum, default_value = "rust")]
        lang: NewLang,
        /// Where to make its directory.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Check the tools plugin builds need, and say how to get those missing.
    Doctor {
        /// Where the pinned toolchains are installed (as for `build`).
        #[arg(long, env = "QFLOW_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
    },
}

/// A language `qflow new` writes a project in.
#[derive(Clone, Copy, clap::ValueEnum)]
enum NewLang {
    Rust,
    Python,
    Js,
}

/// Where `build` installs the Python and JavaScript toolchains, if the
/// command line says (otherwise the builder's own default, the user's
/// cache directory).
fn toolchains(cache_dir: Option<PathBuf>) -> Option<PathBuf> {
    cache_dir.map(|d| d.join("toolchains"))
}

#[derive(Subcommand)]
enum PluginsCommand {
    /// List the plugins with what they say about themselves.
    List {
        #[command(flatten)]
        host: HostArgs,
        /// Print JSON on stdout.
        #[arg(long)]
        json: bool,
    },
}

/// Which step outputs a run's summary shows.
#[derive(clap::Args, Clone, Copy)]
pub(crate) struct OutputArgs {
    /// Which outputs the summary shows: those of the steps nothing depends
    /// on (the flow's results), all, or none.
    #[arg(long, default_value = "leaves")]
    outputs: Keep,
    /// Outputs over this many bytes of JSON are shown as their digest
    /// (`{"sha256", "bytes"}`); the run itself keeps intermediate outputs
    /// over it only until the steps that need them have them.
    #[arg(long, default_value_t = 1 << 20)]
    output_max_bytes: u64,
}

impl OutputArgs {
    /// The run's options with this retention: an intermediate output is
    /// kept whole only as far as something will show or store it.
    fn apply(self, options: RunOptions) -> RunOptions {
        let shown = if self.outputs == Keep::All { self.output_max_bytes } else { 0 };
        options.retain_output_bytes(shown.max(STORED_OUTPUT_BYTES as u64))
    }

    /// What of `summary` is shown.
    fn select(self, flow: &Flow, summary: &mut RunSummary) {
        summary.select_outputs(flow, self.outputs, self.output_max_bytes);
    }
}

/// Where a host finds its plugins and keeps their compiled code.
#[derive(clap::Args)]
pub(crate) struct HostArgs {
    /// The plugins directory.
    #[arg(long = "plugins", env = "QFLOW_PLUGINS", default_value = "plugins")]
    plugins: PathBuf,
    /// Where precompiled components are kept between runs (default: the
    /// platform's cache directory, such as ~/.cache/qflow).
    #[arg(long, env = "QFLOW_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Where the run store (`qflow.db`) is kept (default: the platform's
    /// data directory, such as ~/.local/share/qflow).
    #[arg(long, env = "QFLOW_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The timeout of a step whose flow sets none (such as 90s or 15m).
    #[arg(long, env = "QFLOW_STEP_TIMEOUT", default_value = "15m")]
    step_timeout: humantime::Duration,
    /// How long one run may take in all.
    #[arg(long, env = "QFLOW_RUN_TIMEOUT", default_value = "24h")]
    run_timeout: humantime::Duration,
    /// The memory all plugin instances together may hold, in MiB (default:
    /// half the machine's); an instance past it waits for memory.
    #[arg(long, env = "QFLOW_MAX_TOTAL_MEMORY_MB")]
    max_total_memory_mb: Option<u64>,
    /// How long a step's HTTP request may wait for its response's headers,
    /// connecting included.
    #[arg(long, env = "QFLOW_HTTP_TIMEOUT", default_value = "30s")]
    http_timeout: humantime::Duration,
    /// Keep-alive connections per origin (scheme, host, port), shared by
    /// every step.
    #[arg(long, env = "QFLOW_HTTP_MAX_CONNECTIONS", default_value_t = 16,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    http_max_connections: u64,
    /// The largest HTTP response body a step may read, in bytes.
    #[arg(long, env = "QFLOW_HTTP_MAX_RESPONSE_BYTES", default_value_t = 64 << 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    http_max_response_bytes: u64,
    /// A database every flow's steps may be granted (`databases = ["ID"]`):
    /// `ID=sqlite:PATH` or `ID=postgres://USER:PASSWORD@HOST/NAME`.
    /// Repeatable; in the variable, separated by spaces.
    #[arg(long = "database", value_name = "ID=URL", env = "QFLOW_DATABASES",
          value_delimiter = ' ', value_parser = database)]
    databases: Vec<(String, String)>,
    /// A database steps may only read, as `--database` writes it.
    #[arg(long = "read-only-database", value_name = "ID=URL", env = "QFLOW_READ_ONLY_DATABASES",
          value_delimiter = ' ', value_parser = database)]
    read_only_databases: Vec<(String, String)>,
    /// The largest output a step may return, in bytes (default 16 MiB); a
    /// flow may set a lower limit, never a higher one.
    #[arg(long, env = "QFLOW_MAX_OUTPUT_BYTES")]
    max_output_bytes: Option<u64>,
    /// Each step's linear memory limit, in MiB (default 256); a flow may set
    /// a lower one.
    #[arg(long, env = "QFLOW_MAX_MEMORY_MB")]
    max_memory_mb: Option<u64>,
    /// What one step call may print and log into its report, in bytes
    /// (default 1 MiB); a flow may set a lower limit.
    #[arg(long, env = "QFLOW_MAX_LOG_BYTES")]
    max_log_bytes: Option<u64>,
    /// Keep at most this many runs in the run store (default: no limit).
    #[arg(long, env = "QFLOW_KEEP_RUNS")]
    keep_runs: Option<u64>,
    /// Keep no run older than this many days in the run store.
    #[arg(long, env = "QFLOW_KEEP_DAYS", default_value_t = 90)]
    keep_days: u64,
}

impl HostArgs {
    /// How long the run store keeps runs.
    pub(crate) fn retention(&self) -> Retention {
        let retention = Retention::forever().keep_days(self.keep_days);
        match self.keep_runs {
            Some(runs) => retention.keep_runs(runs),
            None => retention,
        }
    }

    /// The run store's file.
    pub(crate) fn store_path(&self) -> anyhow::Result<PathBuf> {
        let dir = match &self.data_dir {
            Some(dir) => dir.clone(),
            None => dirs::data_dir()
                .map(|dir| dir.join("qflow"))
                .context("no data directory on this platform: give --data-dir or QFLOW_DATA_DIR")?,
        };
        Ok(dir.join("qflow.db"))
    }
}

/// The run store of `args`, opened (and migrated).
pub(crate) async fn open_store(args: &HostArgs) -> anyhow::Result<Arc<SqliteStore>> {
    let path = args.store_path()?;
    let store = Arc::new(SqliteStore::open(&path).await?);
    // What retention no longer keeps goes in the background; a command
    // that ends first leaves it for the next one.
    let (pruning, retention) = (store.clone(), args.retention());
    tokio::spawn(async move {
        if let Err(e) = pruning.prune(retention).await {
            tracing::warn!("{e}");
        }
    });
    Ok(store)
}

/// A host that keeps its runs in the run store of `args`.
pub(crate) async fn host_with_store(args: &HostArgs) -> anyhow::Result<Host> {
    host_with_store_for(args, Room::Any).await
}

/// [`host_with_store`], with room for `room`.
pub(crate) async fn host_with_store_for(args: &HostArgs, room: Room) -> anyhow::Result<Host> {
    let store = open_store(args).await?;
    Ok(host_with_room(args, room)?.with_store(store, STORED_OUTPUT_BYTES).await?)
}

/// Step outputs up to this size (as JSON) are kept whole in the run store;
/// larger ones as their hash and size. 64 KiB keeps a report readable and
/// the store small.
pub(crate) const STORED_OUTPUT_BYTES: usize = 64 << 10;

/// How long a finishing command waits for its runs to reach the store.
const FLUSH_WITHIN: Duration = Duration::from_secs(10);

/// Waits for `host`'s runs to reach the store, warning if they did not.
pub(crate) async fn flush(host: &Host) {
    if !host.flush_runs(FLUSH_WITHIN).await {
        eprintln!(
            "warning: the run store did not take this run within {} s; it is not kept",
            FLUSH_WITHIN.as_secs()
        );
    }
}

/// Exit codes: 0 the command did what was asked, 1 a run failed, 2 it could
/// not be carried out (a bad flow, a missing plugin, a build error).
fn main() -> ExitCode {
    let cli = Cli::parse();
    // Dropped after `dispatch`, whose runtimes are gone by then: the
    // exporter's last spans are flushed from the plain main thread.
    let _telemetry = telemetry::init();
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Build { path, out, debug, cache_dir } => {
            let out = out.unwrap_or_else(default_plugins_dir);
            let options = qflow_plugin_build::Options {
                release: !debug,
                toolchains: toolchains(cache_dir),
                ..Default::default()
            };
            for built in qflow_plugin_build::build(&path, &out, &options)? {
                eprintln!("built {} -> {}", built.name, built.path.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::New { name, lang, dir } => {
            let lang = match lang {
                NewLang::Rust => qflow_plugin_build::Lang::Rust,
                NewLang::Python => qflow_plugin_build::Lang::Python,
                NewLang::Js => qflow_plugin_build::Lang::JavaScript,
            };
            for file in qflow_plugin_build::new_project(&dir, &name, lang)? {
                eprintln!("wrote {}", file.display());
            }
            let project = dir.join(&name);
            eprintln!(
                "next: qflow build {p} --out {p}/plugins && qflow run {p}/flow.toml --plugins {p}/plugins --input '\"to be or not to be\"'",
                p = project.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Doctor { cache_dir } => {
            let checks = qflow_plugin_build::doctor(toolchains(cache_dir).as_deref());
            for check in &checks {
                println!(
                    "{} {:36} {}",
                    if check.ok { "ok  " } else { "MISSING" },
                    check.tool,
                    check.detail
                );
            }
            Ok(if checks.iter().all(|c| c.ok) { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Command::Run { flow, host, input, max_parallel, json, events, outputs } => {
            let mut options = outputs.apply(RunOptions::new());
            options.max_parallel = max_parallel;
            let printed = Printed { json, outputs };
            block_on(run(&flow, &host, &input, options, printed, events.as_deref()))
        }
        Command::Plan { flow, host, json } => block_on(plan(&flow, &host, json)),
        Command::Watch { flow, host, input, json } => {
            block_on(watch(flow.as_deref(), &host, &input, json))
        }
        Command::Serve { addr, host, flows, token, level, grace_secs } => {
            let mut config = qflow_server::ServerConfig::default();
            config.addr = addr;
            config.flows_dir = flows;
            config.token = token;
            config.level = level;
            config.grace = Duration::from_secs(grace_secs);
            block_on(serve(&host, config))
        }
        Command::Optimization { command } => block_on(optimization::run(command)),
        Command::Runs { command } => block_on(runs::run(command)),
        Command::Plugins { command: PluginsCommand::List { host, json } } => {
            block_on(list(&host, json))
        }
    }
}

/// The plugins directory from `QFLOW_PLUGINS` or the default, for `build`,
/// which takes it as an optional output.
fn default_plugins_dir() -> PathBuf {
    std::env::var_os("QFLOW_PLUGINS").map_or_else(|| "plugins".into(), PathBuf::from)
}

/// Runs a command on a new runtime, then shuts the runtime down without
/// waiting long for what is left: a plugin's blocking call stuck in the
/// kernel (a FIFO opened in a granted directory) holds a blocking thread
/// forever, and must not hold the process, its exit code or its signals.
fn block_on<T>(command: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")?;
    let result = runtime.block_on(command);
    runtime.shutdown_timeout(SHUTDOWN_WITHIN);
    result
}

/// How long a finished command waits for its runtime's last tasks.
const SHUTDOWN_WITHIN: Duration = Duration::from_millis(250);

/// How many step instances a host makes room for. The engine reserves a
/// stack with a guard page for each, up front: room for a thousand costs a
/// short process more than its whole run (a thousand `mprotect` calls, and
/// as many to undo), so a command that runs one flow makes room for what
/// that flow can use.
#[derive(Clone, Copy)]
pub(crate) enum Room {
    /// Any flow: a server, a watch (the engine's default, 1000).
    Any,
    /// One flow of this many steps: two instances a step (one running, one
    /// spare), at least 16.
    Flow(usize),
    /// No step runs (plan, plugins list): `describe` has slots of its own.
    Nothing,
}

/// A host on the plugins directory; must be called inside the runtime, so
/// that it can preload hot plugins in the background.
pub(crate) fn host(args: &HostArgs) -> anyhow::Result<Host> {
    host_with_room(args, Room::Any)
}

/// [`host`], with room for `room`.
pub(crate) fn host_with_room(args: &HostArgs, room: Room) -> anyhow::Result<Host> {
    let plugins = &args.plugins;
    if !plugins.is_dir() {
        bail!(
            "the plugins directory {} does not exist: build the bundled plugins with `qflow build plugins`, \
             or point --plugins (or QFLOW_PLUGINS) at a directory of components",
            plugins.display()
        );
    }
    let mut config = HostConfig::new(plugins);
    if let Some(dir) = &args.cache_dir {
        config.cache.dir = Some(dir.clone());
    }
    config.step_timeout = args.step_timeout.into();
    config.run_timeout = args.run_timeout.into();
    match room {
        Room::Any => {}
        Room::Flow(steps) => {
            let room = steps.saturating_mul(2).saturating_add(8).clamp(16, 1000);
            config.engine.max_instances = u32::try_from(room).unwrap_or(1000);
        }
        Room::Nothing => config.engine.max_instances = 1,
    }
    if let Some(mb) = args.max_total_memory_mb {
        config.engine.max_total_memory_mb = mb;
    }
    if args.http_timeout.is_zero() {
        anyhow::bail!("--http-timeout must be more than 0 (such as 30s)");
    }
    let mut http_pool = config.engine.http.pool;
    http_pool.max = usize::try_from(args.http_max_connections).unwrap_or(usize::MAX);
    config.engine.http = config
        .engine
        .http
        .pool(http_pool)
        .request_timeout(args.http_timeout.into())
        .max_response_bytes(args.http_max_response_bytes);
    let databases = args.databases.iter().map(|d| (d, false));
    for ((id, url), read_only) in
        databases.chain(args.read_only_databases.iter().map(|d| (d, true)))
    {
        let database = qflow::model::Database::new(id, url).read_only(read_only);
        // A relative SQLite path means the working directory, as on any command line.
        config.databases.push(database.resolved(&std::env::current_dir()?));
    }
    if let Some(bytes) = args.max_output_bytes {
        config.max_output_bytes = bytes;
    }
    if let Some(mb) = args.max_memory_mb {
        config.max_memory_bytes = mb.saturating_mul(1 << 20);
    }
    if let Some(bytes) = args.max_log_bytes {
        config.max_log_bytes = bytes;
    }
    Ok(Host::new(config)?)
}

/// How large a flow and an input may be: the library's defaults, or
/// `QFLOW_MAX_STEPS`, `QFLOW_MAX_NEEDS` and `QFLOW_MAX_INPUT_BYTES` (which
/// bounds flow files and `--input @FILE` alike).
pub(crate) fn limits() -> FlowLimits {
    let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let mut limits = FlowLimits::default();
    if let Some(n) = var("QFLOW_MAX_STEPS") {
        limits.max_steps = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(n) = var("QFLOW_MAX_NEEDS") {
        limits.max_edges = usize::try_from(n).unwrap_or(usize::MAX);
    }
    if let Some(n) = var("QFLOW_MAX_INPUT_BYTES") {
        limits.max_bytes = n;
    }
    limits
}

/// A flow file, within the limits.
pub(crate) fn load_flow(path: &Path) -> anyhow::Result<Flow> {
    Ok(Flow::load_with(path, &limits())?)
}

fn read_input(input: &str) -> anyhow::Result<Value> {
    let limit = limits().max_bytes;
    let (text, origin) = match input.strip_prefix('@') {
        Some(path) => (
            qflow::model::read_text(Path::new(path), limit)
                .with_context(|| format!("cannot read --input {path}"))?,
            path,
        ),
        None => (input.to_owned(), "--input"),
    };
    serde_json::from_str(&text).with_context(|| format!("{origin} is not JSON"))
}

/// How a run's summary is printed.
#[derive(Clone, Copy)]
pub(crate) struct Printed {
    json: bool,
    outputs: OutputArgs,
}

impl Printed {
    /// Prints `summary` (its outputs selected) as JSON or as lines.
    pub(crate) fn print(self, flow: &Flow, summary: &RunSummary) -> anyhow::Result<()> {
        let mut shown = summary.clone();
        self.outputs.select(flow, &mut shown);
        if self.json {
            println!("{}", serde_json::to_string_pretty(&shown)?);
        } else {
            print_summary(&shown);
        }
        Ok(())
    }

    /// The default: lines, the flow's results up to 1 MiB each.
    pub(crate) fn lines() -> Printed {
        Printed {
            json: false,
            outputs: OutputArgs { outputs: Keep::Leaves, output_max_bytes: 1 << 20 },
        }
    }

    /// JSON or lines, the flow's results up to 1 MiB each.
    pub(crate) fn json(json: bool) -> Printed {
        Printed { json, ..Printed::lines() }
    }
}

async fn run(
    flow: &Path,
    args: &HostArgs,
    input: &str,
    options: RunOptions,
    printed: Printed,
    events: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let flow = load_flow(flow)?;
    let input = read_input(input)?;
    let host = host_with_store_for(args, Room::Flow(flow.steps.len())).await?;
    // Known before the run starts, so that --events can follow it.
    let run_id = uuid::Uuid::new_v4().to_string();
    let options = options.run_id(run_id.clone());
    let recorder = match events {
        Some(path) => Some(record_events(&host, path, run_id)?),
        None => None,
    };
    let progress = std::io::stderr().is_terminal().then(|| show_progress(&host, &flow));
    // Ctrl-C and SIGTERM (a service manager stopping it) cancel the run:
    // running steps are cut, and the summary still says what finished,
    // what was cut and what never started. The handlers are in place
    // before the run starts.
    let signalled = stop_on_signals(options.cancel.clone())?;
    let summary = host.run_with(&flow, input, options).await?;
    if let Some(progress) = progress {
        progress.finish_and_clear();
    }
    flush(&host).await;
    if let Some(recorder) = recorder {
        recorder.await.context("writing the events failed")??;
    }
    printed.print(&flow, &summary)?;
    match signalled.get() {
        Some(&code) if summary.status == RunStatus::Cancelled => Ok(ExitCode::from(code)),
        _ => Ok(status_code(summary.status)),
    }
}

/// Cancels `cancel` on Ctrl-C (SIGINT) or SIGTERM; the cell then holds the
/// exit code the shell expects for that signal: 130 or 143.
fn stop_on_signals(cancel: CancellationToken) -> anyhow::Result<Arc<OnceLock<u8>>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle Ctrl-C")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    let signalled = Arc::new(OnceLock::new());
    let cell = signalled.clone();
    tokio::spawn(async move {
        let (code, name) = tokio::select! {
            _ = interrupt.recv() => (130, "interrupted"),
            _ = terminate.recv() => (143, "terminated"),
        };
        let _ = cell.set(code);
        eprintln!("{name}: stopping the run (a second signal stops at once)");
        cancel.cancel();
        // The handlers stay installed: without this, a run whose cut steps
        // take a while to end could only be killed.
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        std::process::exit(i32::from(code));
    });
    Ok(signalled)
}

/// A run's exit code: 0 succeeded, 1 failed, 130 cancelled (as by Ctrl-C).
pub(crate) fn status_code(status: RunStatus) -> ExitCode {
    match status {
        RunStatus::Succeeded => ExitCode::SUCCESS,
        RunStatus::Failed => ExitCode::from(1),
        RunStatus::Cancelled => ExitCode::from(130),
    }
}

/// Ctrl-C (SIGINT), listened for from now on.
fn interrupt_signal() -> anyhow::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .context("cannot handle Ctrl-C")
}

async fn serve(args: &HostArgs, config: qflow_server::ServerConfig) -> anyhow::Result<ExitCode> {
    let host = Arc::new(host_with_store(args).await?);
    let _watch = host.watch()?;
    // Retention again every hour while the server runs (and once at open).
    if let Some(store) = host.store().cloned() {
        let retention = args.retention();
        tokio::spawn(async move {
            let mut hourly = tokio::time::interval(Duration::from_secs(3600));
            hourly.tick().await;
            loop {
                hourly.tick().await;
                if let Err(e) = store.prune(retention).await {
                    tracing::warn!("{e}");
                }
            }
        });
    }
    let state = qflow_server::AppState::new(host.clone(), config)?;
    state.watch_flows();
    // SIGTERM (a service manager) and Ctrl-C both stop it gracefully.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    let mut interrupt = interrupt_signal()?;
    let signal = async move {
        tokio::select! {
            _ = terminate.recv() => {}
            _ = interrupt.recv() => {}
        }
        eprintln!("stopping: runs in flight finish first (a second signal stops at once)");
        // A second signal means "now": the handlers stay installed, so
        // without this the process could only be killed.
        tokio::spawn(async move {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
            std::process::exit(130);
        });
    };
    qflow_server::serve(state, signal, |addr| eprintln!("qflow serving on http://{addr}")).await?;
    flush(&host).await;
    Ok(ExitCode::SUCCESS)
}

/// Writes the run's events to `path` as JSON lines, from now until it ends.
fn record_events(
    host: &Host,
    path: &Path,
    run_id: String,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    use std::io::Write;
    let file = std::fs::File::create(path)
        .with_context(|| format!("cannot write --events {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let mut events = host.subscribe();
    Ok(tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) if event.data.run_id() == Some(run_id.as_str()) => {
                    serde_json::to_writer(&mut out, &event)?;
                    out.write_all(b"\n")?;
                    if matches!(event.data, EventData::RunFinished { .. }) {
                        break;
                    }
                }
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                    writeln!(out, "{}", serde_json::json!({"type": "lagged", "missed": missed}))?;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
        out.flush()?;
        Ok(())
    }))
}

async fn watch(
    flow: Option<&Path>,
    args: &HostArgs,
    input: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let flow = flow.map(load_flow).transpose()?;
    let input = read_input(input)?;
    let host = host_with_store(args).await?;
    let _watch = host.watch()?;
    // One listener for the whole watch: a Ctrl-C (or SIGTERM) that comes
    // while a run is printing is kept for the next look, not lost between
    // two listeners.
    let mut interrupt = interrupt_signal()?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot handle SIGTERM")?;
    let mut events = host.subscribe();
    eprintln!("watching {} (Ctrl-C to stop)", args.plugins.display());
    if let Some(flow) = &flow {
        run_once(&host, flow, &input, json).await?;
    }
    loop {
        let event = tokio::select! {
            event = events.recv() => event,
            _ = interrupt.recv() => return Ok(ExitCode::SUCCESS),
            _ = terminate.recv() => return Ok(ExitCode::SUCCESS),
        };
        let event = match event {
            Ok(event) => event,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return Ok(ExitCode::SUCCESS),
        };
        let changed = match &event.data {
            EventData::PluginAdded { plugin, version } => {
                Some((plugin.clone(), format!("added {plugin} {}", printable(version))))
            }
            EventData::PluginReloaded { plugin, version } => {
                Some((plugin.clone(), format!("reloaded {plugin}: now {}", printable(version))))
            }
            EventData::PluginReloadFailed { plugin, error } => {
                Some((plugin.clone(), format!("kept the old {plugin}: {}", printable(error))))
            }
            EventData::PluginRemoved { plugin } => {
                Some((plugin.clone(), format!("removed {plugin}")))
            }
            _ => None,
        };
        let Some((plugin, line)) = changed else { continue };
        if json {
            println!("{}", serde_json::to_string(&event)?);
        } else {
            println!("{line}");
        }
        let rerun =
            matches!(event.data, EventData::PluginReloaded { .. } | EventData::PluginAdded { .. });
        if let Some(flow) =
            flow.as_ref().filter(|f| rerun && f.steps.iter().any(|s| *s.plugin.name == *plugin))
        {
            run_once(&host, flow, &input, json).await?;
        }
    }
}

/// One run for `watch`: its summary on stdout, an invalid flow on stderr.
async fn run_once(host: &Host, flow: &Flow, input: &Value, json: bool) -> anyhow::Result<()> {
    let printed = Printed::json(json);
    let options = printed.outputs.apply(RunOptions::new());
    match host.run_with(flow, input.clone(), options).await {
        Ok(mut summary) if json => {
            printed.outputs.select(flow, &mut summary);
            println!("{}", serde_json::to_string(&summary)?);
        }
        Ok(summary) => printed.print(flow, &summary)?,
        Err(e) => eprintln!("error: {e}"),
    }
    Ok(())
}

async fn plan(flow: &Path, args: &HostArgs, json: bool) -> anyhow::Result<ExitCode> {
    let flow = load_flow(flow)?;
    let host = host_with_room(args, Room::Nothing)?;
    host.check(&flow)?;
    let plan = host.plan(&flow);
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(ExitCode::SUCCESS);
    }
    let unit = if plan.estimated { "ms, from past runs" } else { "steps; no runs yet" };
    println!("order: {}", plan.order.join(", "));
    for (k, group) in plan.groups.iter().enumerate() {
        println!("group {k}: {}", group.join(", "));
    }
    println!(
        "critical path: {} ({:.1} {unit}); parallelization {:.2}",
        plan.critical_path.join(" -> "),
        plan.critical_path_ms,
        plan.parallelization
    );
    for conflict in &plan.conflicts {
        println!(
            "resource {:?}: {} never run at once",
            conflict.resource,
            conflict.steps.join(", ")
        );
    }
    for r in &plan.redundant {
        println!("step {}: needs {} is implied by {}", r.step, r.needs, r.implied_by);
    }
    Ok(ExitCode::SUCCESS)
}

/// A progress bar on stderr, fed by the host's events.
fn show_progress(host: &Host, flow: &Flow) -> ProgressBar {
    let bar = ProgressBar::new(flow.steps.len() as u64);
    bar.set_style(
        ProgressStyle::with_template("{spinner} {pos}/{len} steps [{elapsed}] {wide_msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let mut events = host.subscribe();
    let updater = bar.clone();
    tokio::spawn(async move {
        while let Ok(event) = events.recv().await {
            match event.data {
                EventData::StepStarted { step, .. } => {
                    updater.set_message(format!("running {step}"))
                }
                EventData::StepFinished { step, status, .. } => {
                    updater.inc(1);
                    if status == StepStatus::Failed {
                        updater.println(format!("✗ {step} failed"));
                    }
                }
                EventData::RunFinished { .. } => break,
                _ => {}
            }
        }
    });
    bar
}

/// A summary as lines: one per step, then the outputs the summary kept.
/// Everything a plugin controls (outputs, error messages) is escaped: a
/// control character is shown as `\u{…}`, an error stays on its line, and
/// every line of an output is marked as part of it, so no plugin can forge
/// a status line or drive the terminal.
pub(crate) fn print_summary(summary: &RunSummary) {
    let width = summary.steps.iter().map(|s| s.id.len()).max().unwrap_or(0);
    for step in &summary.steps {
        let mark = match step.status {
            StepStatus::Succeeded => "✓",
            StepStatus::Failed => "✗",
            StepStatus::Cancelled => "⊘",
            StepStatus::Skipped => "-",
        };
        let timing = match (step.start_ms, step.end_ms) {
            (Some(start), Some(end)) => format!("{start:8.1} → {end:8.1} ms"),
            _ => format!("{:>22}", format!("{:?}", step.status).to_lowercase()),
        };
        // The load phase (a compile, the disk cache, a first instance) when
        // it is worth a look: a cold start's time is mostly that.
        let load = match step.load_ms {
            Some(ms) if ms >= 1.0 => {
                format!("  (load {ms:.1} ms, run {:.1} ms)", step.run_ms.unwrap_or(0.0))
            }
            _ => String::new(),
        };
        println!("{mark} {:width$}  {timing}  {}{load}", step.id, step.plugin);
        if let Some(error) = &step.error {
            println!("    {}", printable(&error.message));
        }
    }
    let status = match summary.status {
        RunStatus::Succeeded => "succeeded",
        RunStatus::Failed => "failed",
        RunStatus::Cancelled => "was cancelled",
    };
    println!(
        "flow {} {status} in {:.1} ms (run {})",
        summary.flow, summary.wall_ms, summary.run_id
    );
    let components = &summary.store.components;
    if components.compiles > 0 || components.disk_hits > 0 {
        println!(
            "plugins: {} compiled ({:.0} ms of Cranelift), {} loaded precompiled from the cache",
            components.compiles, components.compile_ms, components.disk_hits
        );
    }
    for step in &summary.steps {
        let Some(output) = &step.output else { continue };
        println!("\n── {} ──", step.id);
        let text = match output.value() {
            Value::String(text) => text,
            other => serde_json::to_string_pretty(&other).unwrap_or_default(),
        };
        for line in printable_lines(text.trim_end()).lines() {
            println!("│ {line}");
        }
    }
}

async fn list(args: &HostArgs, json: bool) -> anyhow::Result<ExitCode> {
    let host = host_with_room(args, Room::Nothing)?;
    let described = host.catalog().describe_all().await?;
    if json {
        let entries: Vec<Value> = described
            .iter()
            .map(|(name, d)| match d {
                Ok(info) => serde_json::to_value(info).unwrap_or_default(),
                Err(e) => serde_json::json!({ "name": name, "error": qflow::error_chain(e) }),
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&entries)?);
    } else {
        for (_, d) in &described {
            match d {
                Ok(info) => {
                    println!(
                        "{:14} {:8} {:7} {}",
                        printable(&info.name),
                        printable(&info.version),
                        info.kind,
                        printable(&info.description)
                    );
                    for warning in &info.warnings {
                        println!("  warning: {}", printable(warning));
                    }
                }
                Err(e) => println!("error: {}", printable(&qflow::error_chain(e))),
            }
        }
    }
    let broken = described.iter().filter(|(_, d)| d.is_err()).count();
    Ok(if broken == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `ID=URL`, as `--database` takes it.
fn database(text: &str) -> Result<(String, String), String> {
    let (id, url) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: write ID=URL, such as orders=sqlite:orders.db"))?;
    let valid =
        !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(format!("{id:?} is not a database id: use letters, digits, `-` and `_`"));
    }
    Ok((id.to_owned(), url.to_owned()))
}
