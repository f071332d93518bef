//! Qflow's benchmarks: `cargo bench -p qflow` runs every scenario and prints
//! one table. Each figure is a ratio against a baseline measured in the same
//! run on the same machine, never an absolute target.
//!
//! `cargo bench -p qflow -- NAME` runs only the scenarios whose name contains NAME.

// A benchmark that cannot set itself up has nothing to report: panicking
// with the reason is the right thing.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use qflow::{Flow, Format, Host, HostConfig, RunStatus};
use serde_json::json;

mod bare {
    //! The baseline: the same trivial component on bare wasmtime, through
    //! its own bindings, with nothing of Qflow's in the way.
    wasmtime::component::bindgen!({
        world: "step",
        path: "../wit/0.2.0",
        imports: { "qflow:plugin/host.asset": async },
        exports: { default: async },
    });
}

fn main() {
    // SAFETY: nothing else runs yet. Every error captures a backtrace when
    // RUST_BACKTRACE is set; a benchmark must not pay for that.
    #[allow(unsafe_code)]
    unsafe {
        std::env::set_var("RUST_LIB_BACKTRACE", "0")
    };
    // The bench re-runs itself as the baseline of the `process` scenario.
    let args: Vec<String> = std::env::args().collect();
    if let [_, flag, path] = args.as_slice()
        && flag == "--bare-process"
    {
        bare_process(path);
        return;
    }
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let plugins = build_plugins();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();

    let mut table = Table::default();
    let scenarios: [(&str, Scenario); 12] = [
        ("planning", planning),
        ("floor", floor),
        ("marginal", marginal),
        ("chain", chain),
        ("process", process),
        ("pools", pools),
        ("load", load),
        ("zipf", zipf),
        ("waits", waits),
        ("reload", reload),
        ("http", http),
        ("sql", sql),
    ];
    for (name, scenario) in scenarios {
        if filter.as_deref().is_none_or(|f| name.contains(f)) {
            eprintln!("running {name}...");
            scenario(&rt, &plugins, &mut table);
        }
    }
    table.print();
}

/// A scenario measures on the shared runtime and adds its rows to the table.
type Scenario = fn(&tokio::runtime::Runtime, &Path, &mut Table);

fn build_plugins() -> PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("plugins");
    let repo = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    qflow_plugin_build::build(&repo.join("plugins"), &out, &Default::default())
        .expect("building the bundled plugins");
    out
}

/// The floor: bare wasmtime's pooled `InstancePre` instantiate + call of the
/// same trivial component, with the same reset path as Qflow's engine, on
/// the calling thread and in a spawned task (where a step runs).
struct Floor {
    thread: Duration,
    task: Duration,
}

impl Floor {
    fn measure(rt: &tokio::runtime::Runtime, plugins: &Path) -> Floor {
        let component = plugins.join("identity.wasm");
        Floor {
            thread: rt.block_on(bare_calls(&component, 2000, false, true)),
            task: rt.block_on(bare_calls(&component, 2000, true, true)),
        }
    }

    /// Both rows of a figure against the floor.
    fn rows(&self, table: &mut Table, scenario: &str, qflow: Duration) {
        table.row(scenario, "bare wasmtime", self.thread, qflow);
        table.row(scenario, "bare wasmtime, in a task", self.task, qflow);
    }
}

/// A trivial step's whole run through Qflow (a one-step flow, run to the
/// end: planning, scheduling, an instance from the pool, `run`, checking
/// the output, the summary) against the floor; and, for scale, bare
/// wasmtime with its default reset path (memset and madvise).
fn floor(rt: &tokio::runtime::Runtime, plugins: &Path, table: &mut Table) {
    const CALLS: u32 = 2000;
    let component = plugins.join("identity.wasm");
    let floor = Floor::measure(rt, plugins);
    let defaults = rt.block_on(bare_calls(&component, CALLS, true, false));
    table.row(
        "bare wasmtime, default reset path (memset + madvise), in a task",
        "bare wasmtime, Qflow's reset path, in a task",
        floor.task,
        defaults,
    );
    for (what, pool) in [
        ("fresh instance", ""),
        ("fresh, no spare", "pool = { min = 0 }\n"),
        ("reused instance", "pool = { reuse = 1000000 }\n"),
    ] {
        let host = Host::new(HostConfig::new(plugins)).unwrap();
        let toml =
            format!("[flow]\nname = \"one\"\n[[step]]\nid = \"s\"\nplugin = \"identity\"\n{pool}");
        let flow = flow(&toml);
        let qflow = rt.block_on(async {
            host.run(&flow, json!({})).await.unwrap(); // compile and warm up
            per_call(CALLS, || async {
                let summary = host.run(&flow, json!({})).await.unwrap();
                assert_eq!(summary.status, RunStatus::Succeeded);
            })
            .await
        });
        floor.rows(table, &format!("trivial step, per call (1-step flow, {what})"), qflow);
    }
}

/// The marginal cost of one more independent trivial step: a 400-step flow
/// of `hash` against a 1-step one, whole runs, per extra step.
fn marginal(rt: &tokio::runtime::Runtime, plugins: &Path, table: &mut Table) {
    let floor = Floor::measure(rt, plugins);
    let host = Host::new(HostConfig::new(plugins)).unwrap();
    let flow_of = |n: usize| {
        let mut toml = format!("[flow]\nname = \"wide-{n}\"\n");
        for i in 0..n {
            toml += &format!("[[step]]\nid = \"h{i}\"\nplugin = \"hash\"\n");
        }
        flow(&toml)
    };
    let (one, wide) = (flow_of(1), flow_of(400));
    let time = |flow: &Flow, runs: u32| {
        rt.block_on(async {
            host.run(flow, json!("x")).await.unwrap();
            per_call(runs, || async {
                assert_eq!(host.run(flow, json!("x")).await.unwrap().status, RunStatus::Succeeded);
            })
            .await
        })
    };
    let (t1, t400) = (time(&one, 500), time(&wide, 20));
    let marginal = t400.saturating_sub(t1) / 399;
    floor.rows(table, "one more independent trivial step (400 vs 1 steps of hash)", marginal);
    let per_second = 400.0 / t400.as_secs_f64();
    table.text_row(
        "trivial steps per second, 400 at once on 2 cores",
        "goal ≥ 50 000",
        &format!("{per_second:.0}/s"),
        &format!("{:.1} ms a run of 400", t400.as_secs_f64() * 1e3),
    );
}

/// Planning hostile shapes: 250 steps each needing every earlier one (a
/// 233 KiB file, 31 125 needs, every one but the last of each step
/// redundant), and one cycle through 10 000 steps. The baseline is parsing
/// the same text as plain TOML: what any reader of the file pays.
fn planning(_: &tokio::runtime::Runtime, _: &Path, table: &mut Table) {
    let mut dense = String::from("[flow]\nname = \"dense\"\n");
    for i in 0..250 {
        let needs: Vec<String> = (0..i).map(|j| format!("\"s{j}\"")).collect();
        dense += &format!(
            "[[step]]\nid = \"s{i}\"\nplugin = \"identity\"\nneeds = [{}]\n",
            needs.join(", ")
        );
    }
    let mut cycle = String::from("[flow]\nname = \"cycle\"\n");
    for i in 0..10_000 {
        let need = if i == 0 { 9_999 } else { i - 1 };
        cycle +=
            &format!("[[step]]\nid = \"s{i}\"\nplugin = \"identity\"\nneeds = [\"s{need}\"]\n");
    }
    let time = |f: &dyn Fn()| {
        let samples: Vec<Duration> = (0..5)
            .map(|_| {
                let start = Instant::now();
                f();
                start.elapsed()
            })
            .collect();
        median(samples)
    };
    for (what, text) in
        [("250 steps, each needing every earlier one", &dense), ("a cycle of 10 000 steps", &cycle)]
    {
        let baseline = time(&|| {
            std::hint::black_box(text.parse::<toml::Table>().unwrap());
        });
        let planned = time(&|| match Flow::parse(text, Format::Toml, "<bench>", Path::new(".")) {
            Ok(flow) => {
                std::hint::black_box(qflow::Plan::new(&flow));
            }
            Err(e) => {
                assert!(e.to_string().contains("cycle"), "{e}");
            }
        });
        let scenario = format!("plan (or refuse) {what}, {} KiB", text.len() >> 10);
        table.row(&scenario, "parse as plain TOML", baseline, planned);
    }
}

/// Instance pools: how fast a warm pool hands out an instance, and 100
/// concurrent executions of a step whose `init` works for 5 ms, pooled and
/// not.
fn pools(rt: &tokio::runtime::Runtime, plugins: &Path, table: &mut Table) {
    let dir = tempfile::tempdir().unwrap();
    let hostile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/hostile");
    qflow_plugin_build::build(&hostile, dir.path(), &Default::default()).unwrap();
    let host = |pool: qflow::PoolSettings| {
        let mut config = HostConfig::new(dir.path());
        config.cache.dir = None;
        config.preload = false;
        config.pool = pool;
        Host::new(config).unwrap()
    };
    let settings =
        |min: usize, reuse: u32| qflow::PoolSettings::default().with_min(min).with_reuse(reuse);
    let _ = plugins;

    // (a) Acquisition from a warm pool, against making the instance anew.
    let one = flow(
        "[flow]\nname = \"one\"\n[[step]]\nid = \"s\"\nplugin = \"hostile\"\nconfig = { mode = \"ok\" }\n",
    );
    let acquire = |pool| {
        let host = host(pool);
        rt.block_on(async {
            for _ in 0..2000 {
                host.run(&one, json!({})).await.unwrap();
            }
        });
        let (_, stats) = host.pool_stats().into_iter().next().unwrap();
        stats
    };
    let cold = acquire(settings(0, 1));
    let warm = acquire(settings(1, 1_000_000));
    let us = |v: f64| Duration::from_secs_f64(v / 1e6);
    table.row(
        "pool acquisition p50 (warm vs instantiate + init)",
        "unpooled p50",
        us(cold.acquire_p50_us),
        us(warm.acquire_p50_us),
    );
    table.row(
        "pool acquisition p99 (warm vs instantiate + init)",
        "unpooled p99",
        us(cold.acquire_p99_us),
        us(warm.acquire_p99_us),
    );
    table.text_row(
        "pool acquisition p99, warm",
        "12 ms average reported",
        &format!("{:.1} µs", warm.acquire_p99_us),
        &format!("target < 50 µs; mean {:.1} µs", warm.acquire_mean_us),
    );

    // (b) 100 concurrent executions, init doing 5 ms of real work.
    let mut toml = String::from("[flow]\nname = \"hundred\"\n");
    for i in 0..100 {
        toml += &format!(
            "[[step]]\nid = \"s{i}\"\nplugin = \"hostile\"\nconfig = {{ mode = \"ok\", init_spin_ms = 5 }}\n"
        );
    }
    let hundred = flow(&toml);
    let wall = |pool, settle: Duration| {
        let host = host(pool);
        rt.block_on(async {
            host.run(&hundred, json!({})).await.unwrap(); // compile, fill the pool
            let mut walls = Vec::new();
            for _ in 0..5 {
                tokio::time::sleep(settle).await;
                let summary = host.run(&hundred, json!({})).await.unwrap();
                assert_eq!(summary.status, RunStatus::Succeeded);
                walls.push(Duration::from_secs_f64(summary.wall_ms / 1e3));
            }
            median(walls)
        })
    };
    let unpooled = wall(settings(0, 1), Duration::ZERO);
    let reused = wall(settings(0, 1_000_000), Duration::ZERO);
    // Fresh instances, 100 kept warm: the pool re-makes them between runs.
    let spares = wall(settings(100, 1), Duration::from_millis(1500));
    table.row("100 concurrent steps, 5 ms init: reused instances", "unpooled", unpooled, reused);
    table.row("100 concurrent steps, 5 ms init: 100 fresh spares", "unpooled", unpooled, spares);
}

/// 40 sequential trivial steps (the shape of Windmill's "40 light tasks"):
/// Qflow's cost per step against the floor; and 40 sequential `fib(10)`
/// steps, whose whole run the issue that set the goal measured (≤ 2 ms).
fn chain(rt: &tokio::runtime::Runtime, plugins: &Path, table: &mut Table) {
    const STEPS: usize = 40;
    const RUNS: u32 = 50;
    let floor = Floor::measure(rt, plugins);
    let chain_of = |plugin: &str, config: &str| {
        let mut toml = String::from("[flow]\nname = \"chain\"\n");
        for i in 0..STEPS {
            toml += &format!("[[step]]\nid = \"s{i}\"\nplugin = \"{plugin}\"\n{config}");
            if i > 0 {
                toml += &format!("needs = [\"s{}\"]\n", i - 1);
            }
        }
        flow(&toml)
    };
    let host = Host::new(HostConfig::new(plugins)).unwrap();
    let per_run = |flow: &Flow| {
        rt.block_on(async {
            host.run(flow, json!({})).await.unwrap();
            per_call(RUNS, || async {
                let summary = host.run(flow, json!({"n": 1})).await.unwrap();
                assert_eq!(summary.status, RunStatus::Succeeded);
            })
            .await
        })
    };
    let identity = per_run(&chain_of("identity", ""));
    floor.rows(table, "40 sequential trivial steps, per step", identity / STEPS as u32);
    let fib = per_run(&chain_of("fib", "config = { n = 10 }\n"));
    table.text_row(
        "40 sequential fib(10) steps, whole run",
        "goal ≤ 2 ms",
        &human(fib),
        &format!("{} a step", human(fib / STEPS as u32)),
    );
}

/// 100 concurrent steps each making one HTTP request to a server on
/// loopback: over the pooled keep-alive connections (the default), against
/// the same with a new connection per request. Throughput, as the seed's
/// "3.2× throughput" claim was.
fn http(rt: &tokio::runtime::Runtime, plugins: &Path, table: &mut Table) {
    const STEPS: usize = 100;
    const RUNS: u32 = 30;
    let server = qflow_tests::HttpServer::start();
    let mut toml = format!("[flow]\nname = \"fetch\"\nmax_parallel = {STEPS}\n");
    for i in 0..STEPS {
        toml += &format!(
            "[[step]]\nid = \"get{i}\"\nplugin = \"http-get\"\n\
             config = {{ url = \"http://127.0.0.1:{port}/json\" }}\nhttp = [\"127.0.0.1:{port}\"]\n",
            port = server.port
        );
    }
    let fetches = flow(&toml);
    let per_run = |keep_alive: bool| {
        let mut config = HostConfig::new(plugins);
        config.engine.http = qflow::HttpConfig::default().keep_alive(keep_alive);
        let host = Host::new(config).unwrap();
        rt.block_on(async {
            host.run(&fetches, json!({})).await.unwrap();
            per_call(RUNS, || async {
                let summary = host.run(&fetches, json!({})).await.unwrap();
                assert_eq!(summary.status, RunStatus::Succeeded);
            })
            .await
        })
    };
    let fresh = per_run(false);
    let before = server.accepted();
    let pooled = per_run(true);
    let opened = server.accepted() - before;
    table.row(
        "100 concurrent steps, one HTTP request each, per run",
        "a new connection per request",
        fresh,
        pooled,
    );
    table.text_row(
        "  connections the pooled runs opened",
        "",
        &format!("{opened}"),
        &format!(
            "for {} requests; throughput {:.2}x",
            (RUNS as usize + 1) * STEPS,
            fresh.as_secs_f64() / pooled.as_secs_f64()
        ),
    );
}

/// 100 concurrent steps each running one PostgreSQL query (on a
/// throwaway cluster on loopback): over the pooled connections (the
/// default, at most 10), against the same pool connecting per query.
fn sql(rt: &tokio::runtime::Runtime, plugins: &Path, table: &mut Table) {
    const STEPS: usize = 100;
    const RUNS: u32 = 20;
    let Some(server) = qflow_tests::Postgres::start() else {
        eprintln!("no PostgreSQL here: the sql scenario is skipped");
        return;
    };
    let mut toml = format!("[flow]\nname = \"query\"\nmax_parallel = {STEPS}\n");
    for i in 0..STEPS {
        toml += &format!(
            "[[step]]\nid = \"q{i}\"\nplugin = \"sql\"\ndatabases = [\"pg\"]\n\
             config = {{ db = \"pg\", params = [], statement = \"SELECT {i}::int8 + 1 AS next\" }}\n"
        );
    }
    let queries = flow(&toml);
    let per_run = |keep: bool| {
        let mut config = HostConfig::new(plugins);
        config.engine.sql = qflow::SqlConfig::default().keep_connections(keep);
        config.databases.push(qflow::model::Database::new("pg", server.url.clone()));
        let host = Host::new(config).unwrap();
        let took = rt.block_on(async {
            host.run(&queries, json!({})).await.unwrap();
            per_call(RUNS, || async {
                let summary = host.run(&queries, json!({})).await.unwrap();
                assert_eq!(summary.status, RunStatus::Succeeded);
            })
            .await
        });
        let made = host.db_pool_stats().iter().map(|(_, s)| s.creations).sum::<u64>();
        (took, made)
    };
    let (fresh, _) = per_run(false);
    let (pooled, made) = per_run(true);
    table.row(
        "100 concurrent steps, one PostgreSQL query each, per run",
        "a new connection per query",
        fresh,
        pooled,
    );
    table.text_row(
        "  connections the pooled runs made",
        "",
        &format!("{made}"),
        &format!(
            "for {} queries; throughput {:.2}x",
            (RUNS as usize + 1) * STEPS,
            fresh.as_secs_f64() / pooled.as_secs_f64()
        ),
    );
}

/// The whole `qflow run` process for a 1-step flow, with a warm disk cache,
/// against a process that does the same on bare wasmtime: start, load the
/// precompiled component from disk, instantiate, call, exit.
fn process(_: &tokio::runtime::Runtime, plugins: &Path, table: &mut Table) {
    const RUNS: usize = 30;
    let dir = tempfile::tempdir().unwrap();
    let flow = dir.path().join("one.toml");
    std::fs::write(&flow, "[flow]\nname = \"one\"\n[[step]]\nid = \"s\"\nplugin = \"identity\"\n")
        .unwrap();
    let qflow = qflow_tests::qflow_bin();
    let run_qflow = || {
        let status = std::process::Command::new(qflow)
            .args(["run", flow.to_str().unwrap()])
            .env("QFLOW_PLUGINS", plugins)
            .env("QFLOW_CACHE_DIR", dir.path().join("cache"))
            .env("QFLOW_DATA_DIR", dir.path().join("data"))
            .env("RUST_BACKTRACE", "0")
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    };
    let artifact = dir.path().join("identity.cwasm");
    std::fs::write(
        &artifact,
        bare_engine(true)
            .precompile_component(&std::fs::read(plugins.join("identity.wasm")).unwrap())
            .unwrap(),
    )
    .unwrap();
    let me = std::env::current_exe().unwrap();
    let run_bare = || {
        let status = std::process::Command::new(&me)
            .args(["--bare-process", artifact.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    };
    let time = |f: &dyn Fn()| {
        f();
        f(); // warm: the disk cache, the page cache
        median(
            (0..RUNS)
                .map(|_| {
                    let start = Instant::now();
                    f();
                    start.elapsed()
                })
                .collect(),
        )
    };
    let (bare, whole) = (time(&run_bare), time(&run_qflow));
    table.row(
        "whole process: `qflow run` of a 1-step flow, warm cache (goal < 10 ms)",
        "bare wasmtime process",
        bare,
        whole,
    );
}

/// The baseline process for `process`: the precompiled component at `path`,
/// on bare wasmtime, instantiated and called once.
fn bare_process(path: &str) {
    use wasmtime::component::{Component, HasSelf, Linker};
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let engine = bare_engine(true);
        // SAFETY: the bench wrote this artifact with this engine's settings
        // a moment ago, and nothing changes it.
        #[allow(unsafe_code)]
        let component = unsafe { Component::deserialize_file(&engine, path) }.unwrap();
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
        bare::qflow::plugin::host::add_to_linker::<_, HasSelf<BareState>>(&mut linker, |s| s)
            .unwrap();
        let pre = bare::StepPre::new(linker.instantiate_pre(&component).unwrap()).unwrap();
        let state = BareState {
            wasi: wasmtime_wasi::WasiCtxBuilder::new().build(),
            table: wasmtime::component::ResourceTable::new(),
        };
        let mut store = wasmtime::Store::new(&engine, state);
        let step = pre.instantiate_async(&mut store).await.unwrap();
        let out = step.call_run(&mut store, "{}").await.unwrap().unwrap();
        assert_eq!(out, "{}");
    });
}

/// Loading a component: compiling it (no cache), loading its precompiled
/// artifact from the disk cache (a new host on a warm cache directory), and a
/// memory hit (the same host again), for a small and a large plugin.
fn load(rt: &tokio::runtime::Runtime, plugins: &Path, table: &mut Table) {
    let cache = tempfile::tempdir().unwrap();
    for name in ["identity", "jq"] {
        let host = |cache_dir: Option<&Path>| {
            let mut config = HostConfig::new(plugins);
            config.cache.dir = cache_dir.map(Path::to_path_buf);
            config.preload = false;
            Host::new(config).unwrap()
        };
        let time = |host: &Host| {
            let start = Instant::now();
            rt.block_on(host.catalog().describe(name)).unwrap();
            start.elapsed()
        };
        let compile = median((0..3).map(|_| time(&host(None))).collect());
        time(&host(Some(cache.path()))); // fills the disk cache
        let disk = median((0..9).map(|_| time(&host(Some(cache.path())))).collect());
        let warm = host(None);
        time(&warm);
        let memory = median((0..101).map(|_| time(&warm)).collect());
        let size = std::fs::metadata(plugins.join(format!("{name}.wasm"))).unwrap().len();
        let what = format!("load {name} ({} KiB)", size / 1024);
        table.row(&format!("{what}: disk cache vs compile"), "compile", compile, disk);
        table.row(&format!("{what}: memory hit vs compile"), "compile", compile, memory);
    }
}

/// The reference scenario: 50 components (about 20 MB compiled) behind a
/// memory limit that holds half of them, requested in a skewed (Zipf, s = 1)
/// pattern; the hit rate and the memory used against the limit.
fn zipf(rt: &tokio::runtime::Runtime, plugins: &Path, table: &mut Table) {
    const COMPONENTS: usize = 50;
    const REQUESTS: usize = 5000;
    let dir = tempfile::tempdir().unwrap();
    let identity = std::fs::read(plugins.join("identity.wasm")).unwrap();
    for i in 0..COMPONENTS {
        // A custom section makes each a different component (another digest)
        // with the same code.
        std::fs::write(dir.path().join(format!("c{i}.wasm")), with_custom_section(&identity, i))
            .unwrap();
    }
    let cache = tempfile::tempdir().unwrap();
    let host = |limit: u64| {
        let mut config = HostConfig::new(dir.path());
        config.cache.dir = Some(cache.path().to_path_buf());
        config.cache.memory_limit = limit;
        config.preload = false;
        Host::new(config).unwrap()
    };
    // Compile them all once (filling the disk cache) and weigh them.
    let all = host(u64::MAX);
    for i in 0..COMPONENTS {
        rt.block_on(all.catalog().describe(&format!("c{i}"))).unwrap();
    }
    let total = all.stats().components.memory.bytes;
    let host = host(total / 2);
    let mut random = 0x2545_f491_4f6c_dd1d_u64;
    let weights: Vec<f64> = (1..=COMPONENTS).map(|k| 1.0 / k as f64).collect();
    let sum: f64 = weights.iter().sum();
    let start = Instant::now();
    for _ in 0..REQUESTS {
        random ^= random << 13;
        random ^= random >> 7;
        random ^= random << 17;
        let mut pick = (random >> 11) as f64 / (1u64 << 53) as f64 * sum;
        let k = weights.iter().position(|w| {
            pick -= w;
            pick <= 0.0
        });
        let name = format!("c{}", k.unwrap_or(COMPONENTS - 1));
        rt.block_on(host.catalog().describe(&name)).unwrap();
    }
    let per_request = start.elapsed() / REQUESTS as u32;
    let stats = host.stats().components;
    // The best any cache of this size can do on this distribution: always
    // hold the most popular components that fit.
    let fits = (stats.memory.limit_bytes / (total / COMPONENTS as u64)) as usize;
    let best = weights[..fits.min(COMPONENTS)].iter().sum::<f64>() / sum;
    table.text_row(
        &format!("Zipf over {COMPONENTS} components ({} MB), limit = half", total >> 20),
        &format!("87% claimed; {:.1}% best possible", best * 100.0),
        &format!("hit rate {:.1}%", stats.memory.hit_rate * 100.0),
        &format!(
            "{:.1} of {:.1} MB used, {:.0} µs/request",
            stats.memory.bytes as f64 / 1e6,
            stats.memory.limit_bytes as f64 / 1e6,
            per_request.as_secs_f64() * 1e6
        ),
    );
}

/// The reference scenario: N independent steps that each wait 1 s, run one
/// at a time and all at once; N = 10 and N = 1000. The threads the process
/// has while they wait show that a waiting step holds none.
fn waits(rt: &tokio::runtime::Runtime, plugins: &Path, table: &mut Table) {
    let mut config = HostConfig::new(plugins);
    config.cache.dir = None;
    config.preload = false;
    config.engine.max_instances = 1100; // 1000 waiting steps, each holding one
    let host = Host::new(config).unwrap();
    rt.block_on(host.catalog().describe("sleep")).unwrap();
    let flow_of = |n: usize| {
        let mut toml = format!("[flow]\nname = \"wait-{n}\"\n");
        for i in 0..n {
            toml +=
                &format!("[[step]]\nid = \"w{i}\"\nplugin = \"sleep\"\nconfig = {{ ms = 1000 }}\n");
        }
        flow(&toml)
    };
    let run = |flow: &Flow, max_parallel: Option<usize>| {
        let mut options = qflow::RunOptions::new();
        options.max_parallel = max_parallel;
        let threads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let sampler = {
            let threads = threads.clone();
            rt.spawn(async move {
                tokio::time::sleep(Duration::from_millis(500)).await;
                threads.store(thread_count(), std::sync::atomic::Ordering::Relaxed);
            })
        };
        let summary = rt.block_on(host.run_with(flow, json!({}), options)).unwrap();
        rt.block_on(sampler).unwrap();
        assert_eq!(summary.status, RunStatus::Succeeded);
        (summary, threads.load(std::sync::atomic::Ordering::Relaxed))
    };
    let ten = flow_of(10);
    let (sequential, _) = run(&ten, Some(1));
    let (parallel, threads) = run(&ten, None);
    table.row_ms(
        &format!("10 x 1 s waits: efficiency {:.3}, {threads} threads", parallel.efficiency),
        "max_parallel 1",
        sequential.wall_ms,
        parallel.wall_ms,
    );
    let (thousand, threads) = run(&flow_of(1000), None);
    table.row_ms(
        &format!("1000 x 1 s waits: efficiency {:.3}, {threads} threads", thousand.efficiency),
        "1 s wait",
        1000.0,
        thousand.wall_ms,
    );
}

/// Hot reload: the time from a plugin file's replacement to its new
/// version serving, and failed step executions while a plugin is replaced
/// 20 times under continuous load.
fn reload(rt: &tokio::runtime::Runtime, plugins: &Path, table: &mut Table) {
    let dir = tempfile::tempdir().unwrap();
    let identity = std::fs::read(plugins.join("identity.wasm")).unwrap();
    let path = dir.path().join("swap.wasm");
    std::fs::write(&path, &identity).unwrap();
    let mut config = HostConfig::new(dir.path());
    config.cache.dir = None;
    config.preload = false;
    let host = std::sync::Arc::new(Host::new(config).unwrap());
    let swap = flow("[flow]\nname = \"swap\"\n[[step]]\nid = \"s\"\nplugin = \"swap\"\n");
    let (latency, failures, runs) = rt.block_on(async {
        let _watch = host.watch().unwrap();
        let mut events = host.subscribe();
        host.run(&swap, json!(1)).await.unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let load = {
            let (host, swap, stop) = (host.clone(), swap.clone(), stop.clone());
            tokio::spawn(async move {
                let (mut runs, mut failures) = (0u32, 0u32);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let summary = host.run(&swap, json!(1)).await.unwrap();
                    runs += 1;
                    if summary.status != RunStatus::Succeeded {
                        failures += 1;
                    }
                }
                (runs, failures)
            })
        };
        let mut latencies = Vec::new();
        for i in 0..20 {
            // Each replacement is another component (another digest).
            let tmp = dir.path().join("swap.tmp");
            std::fs::write(&tmp, with_custom_section(&identity, 1000 + i)).unwrap();
            let written = Instant::now();
            std::fs::rename(&tmp, &path).unwrap();
            loop {
                match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
                    Ok(Ok(qflow::Event {
                        data: qflow::EventData::PluginReloaded { .. }, ..
                    })) => break,
                    Ok(Ok(qflow::Event {
                        data: qflow::EventData::PluginReloadFailed { error, .. },
                        ..
                    })) => panic!("{error}"),
                    Ok(Ok(_)) => continue,
                    other => panic!("no reload: {other:?}"),
                }
            }
            latencies.push(written.elapsed());
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (runs, failures) = load.await.unwrap();
        (median(latencies), failures, runs)
    });
    table.text_row(
        "hot reload: file replaced → new version serving (median of 20)",
        "target < 500 ms",
        &human(latency),
        "200 ms of it is the debounce",
    );
    table.text_row(
        "hot reload: 20 replacements under continuous load",
        "target 0 failed",
        &format!("{failures} failed"),
        &format!("of {runs} runs"),
    );
}

/// The process's threads now (Linux); 0 where /proc does not say.
fn thread_count() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status.lines().find_map(|l| l.strip_prefix("Threads:").map(|n| n.trim().parse().ok()))
        })
        .flatten()
        .unwrap_or(0)
}

/// `component` with a custom section `qflow-bench` holding `n` appended: the
/// same code under another digest.
fn with_custom_section(component: &[u8], n: usize) -> Vec<u8> {
    let name = b"qflow-bench";
    let payload = n.to_le_bytes();
    let mut bytes = component.to_vec();
    bytes.push(0); // custom section id
    bytes.push((1 + name.len() + payload.len()) as u8); // section size (LEB128, < 128)
    bytes.push(name.len() as u8);
    bytes.extend_from_slice(name);
    bytes.extend_from_slice(&payload);
    bytes
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn flow(toml: &str) -> Flow {
    Flow::parse(toml, Format::Toml, "<bench>", Path::new(".")).unwrap()
}

/// The median over 5 batches of the mean time per call.
async fn per_call<F, Fut>(calls: u32, mut f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut batches = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..calls.div_ceil(5) {
            f().await;
        }
        batches.push(start.elapsed() / calls.div_ceil(5));
    }
    batches.sort();
    batches[2]
}

struct BareState {
    wasi: wasmtime_wasi::WasiCtx,
    table: wasmtime::component::ResourceTable,
}

impl wasmtime_wasi::WasiView for BareState {
    fn ctx(&mut self) -> wasmtime_wasi::WasiCtxView<'_> {
        wasmtime_wasi::WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl bare::qflow::plugin::host::Host for BareState {
    fn log(&mut self, _: bare::qflow::plugin::types::LogLevel, _: String) {}

    async fn asset(&mut self, _: String) -> Result<Vec<u8>, bare::qflow::plugin::types::StepError> {
        Ok(Vec::new())
    }
}

/// Bare wasmtime's engine: the pooling allocator, with (`tuned`) the reset
/// path Qflow's engine uses by default, or wasmtime's own defaults.
fn bare_engine(tuned: bool) -> wasmtime::Engine {
    use wasmtime::{Config, Enabled, InstanceAllocationStrategy, PoolingAllocationConfig};
    let mut pool = PoolingAllocationConfig::new();
    if tuned {
        let reset = qflow::ResetPath::default();
        pool.pagemap_scan(Enabled::Auto)
            .linear_memory_keep_resident(reset.memory_keep_resident)
            .table_keep_resident(reset.table_keep_resident);
    }
    let mut config = Config::new();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    wasmtime::Engine::new(&config).unwrap()
}

/// Bare wasmtime: pooling allocator, one `InstancePre`, then per call a new
/// store, an instantiation and one call of `run` — on the calling thread, or
/// (`spawned`) in a task on the multi-threaded runtime, as a step runs.
async fn bare_calls(component: &Path, calls: u32, spawned: bool, tuned: bool) -> Duration {
    use wasmtime::component::{Component, HasSelf, Linker};
    use wasmtime::{Engine, Store};

    let engine = bare_engine(tuned);
    let component = Component::from_file(&engine, component).unwrap();
    let mut linker = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
    bare::qflow::plugin::host::add_to_linker::<_, HasSelf<BareState>>(&mut linker, |s| s).unwrap();
    let pre = bare::StepPre::new(linker.instantiate_pre(&component).unwrap()).unwrap();
    let call = move |pre: bare::StepPre<BareState>, engine: Engine| async move {
        let state = BareState {
            wasi: wasmtime_wasi::WasiCtxBuilder::new().build(),
            table: wasmtime::component::ResourceTable::new(),
        };
        let mut store = Store::new(&engine, state);
        let step = pre.instantiate_async(&mut store).await.unwrap();
        let out = step.call_run(&mut store, "{}").await.unwrap().unwrap();
        assert_eq!(out, "{}");
    };
    per_call(calls, || {
        let (pre, engine) = (pre.clone(), engine.clone());
        async move {
            if spawned {
                tokio::spawn(call(pre, engine)).await.unwrap();
            } else {
                call(pre, engine).await;
            }
        }
    })
    .await
}

/// A duration in the unit that suits it.
fn human(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us < 1e3 {
        format!("{us:.1} µs")
    } else if us < 1e6 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{:.3} s", us / 1e6)
    }
}

/// The printed result: one row per measurement.
#[derive(Default)]
struct Table {
    rows: Vec<[String; 5]>,
}

impl Table {
    fn row(&mut self, scenario: &str, baseline_name: &str, baseline: Duration, qflow: Duration) {
        let ratio = qflow.as_secs_f64() / baseline.as_secs_f64();
        self.rows.push([
            scenario.to_owned(),
            baseline_name.to_owned(),
            human(baseline),
            human(qflow),
            if ratio < 1.0 {
                format!("{ratio:.4}x ({:.0}x faster)", 1.0 / ratio)
            } else {
                format!("{ratio:.2}x")
            },
        ]);
    }

    /// A row of two wall times in ms.
    fn row_ms(&mut self, scenario: &str, baseline_name: &str, baseline_ms: f64, qflow_ms: f64) {
        let ms = |v: f64| Duration::from_secs_f64(v / 1e3);
        self.row(scenario, baseline_name, ms(baseline_ms), ms(qflow_ms));
    }

    /// A row whose figures are not a time ratio.
    fn text_row(&mut self, scenario: &str, baseline: &str, result: &str, detail: &str) {
        self.rows.push([
            scenario.to_owned(),
            baseline.to_owned(),
            String::new(),
            result.to_owned(),
            detail.to_owned(),
        ]);
    }

    fn print(&self) {
        let header = ["scenario", "baseline", "baseline time", "qflow", "ratio / detail"];
        let mut widths = header.map(str::len);
        for row in &self.rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let padded: Vec<String> =
                cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
            println!("| {} |", padded.join(" | "));
        };
        line(&header.map(String::from));
        line(&widths.map(|w| "-".repeat(w)));
        for row in &self.rows {
            line(row);
        }
    }
}
