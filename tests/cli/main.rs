//! The `qflow` binary, run as a user runs it.

// A test that panics on a broken expectation is doing its job.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use qflow_tests::{
    Server, hostile_dir, http, lines, plugins_dir, qflow_bin, repo, scratch, wait_for,
};
use serde_json::Value;

mod langs;

/// `qflow` with the args, from the repository's root, on the bundled
/// plugins, with a cache directory of the tests' own.
fn command(args: &[&str]) -> Command {
    let mut command = Command::new(qflow_bin());
    command
        .args(args)
        .current_dir(repo())
        .env("QFLOW_PLUGINS", plugins_dir())
        .env("QFLOW_CACHE_DIR", scratch("cli-cache"))
        .env("QFLOW_DATA_DIR", scratch("cli-data"))
        .env_remove("QFLOW_LOG");
    command
}

/// Runs `qflow` to the end.
fn qflow(args: &[&str]) -> Output {
    command(args).output().expect("the qflow binary runs")
}

/// Waits for a child to exit, killing it after a generous minute so that a
/// process that ignores a signal fails its test instead of hanging it.
fn exit_of(mut child: std::process::Child) -> std::process::ExitStatus {
    for _ in 0..600 {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("qflow did not exit within a minute of the signal");
}

fn stdout_json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            stderr(out)
        )
    })
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn run_json_reports_every_step_and_exits_zero() {
    let out = qflow(&["run", "examples/orders-report.toml", "--json", "--outputs", "all"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary = stdout_json(&out);
    assert_eq!(summary["status"], "succeeded");
    assert_eq!(summary["flow"], "orders-report");
    assert_eq!(summary["run_id"].as_str().unwrap().len(), 36);
    assert!(summary["wall_ms"].as_f64().unwrap() > 0.0);
    let steps = summary["steps"].as_array().unwrap();
    let ids: Vec<&str> = steps.iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["orders", "totals", "checksum", "report"]);
    for step in steps {
        assert_eq!(step["status"], "succeeded");
        assert_eq!(step["attempts"], 1);
        assert!(step["start_ms"].as_f64().unwrap() <= step["end_ms"].as_f64().unwrap());
        assert!(step.get("output").is_some() && step.get("error").is_none(), "{step}");
    }
    assert_eq!(steps[1]["output"]["count"], 8);
    let components = &summary["store"]["components"];
    let loaded =
        components["compiles"].as_u64().unwrap() + components["disk_hits"].as_u64().unwrap();
    assert!(loaded >= 5, "csv, jq, hash, template and file-loader were loaded: {components}");
}

#[test]
fn run_json_embeds_the_flows_results_by_default_and_what_outputs_selects() {
    let outputs = |args: &[&str]| {
        let mut all = vec!["run", "examples/orders-report.toml", "--json"];
        all.extend(args);
        let out = qflow(&all);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let summary = stdout_json(&out);
        let steps = summary["steps"].as_array().unwrap().clone();
        steps
            .into_iter()
            .map(|s| (s["id"].as_str().unwrap().to_owned(), s.get("output").cloned()))
            .collect::<Vec<_>>()
    };
    let leaves = outputs(&[]);
    let with_output: Vec<&str> =
        leaves.iter().filter(|(_, o)| o.is_some()).map(|(id, _)| id.as_str()).collect();
    assert_eq!(with_output, ["report"], "only the step nothing depends on");
    assert!(outputs(&["--outputs", "none"]).iter().all(|(_, o)| o.is_none()));
    // Over the cap, an output is shown as its digest.
    let capped = outputs(&["--outputs", "all", "--output-max-bytes", "100"]);
    let (_, orders) = &capped[0];
    let orders = orders.as_ref().unwrap();
    assert_eq!(orders["sha256"].as_str().map(str::len), Some(64), "{orders}");
    assert!(orders["bytes"].as_u64().unwrap() > 100, "{orders}");
}

#[test]
fn run_takes_input_from_a_file_and_prints_results_for_people() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("input.json");
    std::fs::write(&input, r#"{"label": "from-a-file"}"#).unwrap();
    let out = qflow(&["run", "examples/fan-out.toml", "--input", &format!("@{}", input.display())]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("flow fan-out succeeded"), "{text}");
    assert!(
        text.contains("\"label\": \"from-a-file\"") && text.contains("\"fib\": 75025"),
        "{text}"
    );
}

#[test]
fn a_failed_run_exits_one_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let flow = dir.path().join("fails.toml");
    std::fs::write(
        &flow,
        "[flow]\nname = \"fails\"\n[[step]]\nid = \"boom\"\nplugin = \"hostile\"\nconfig = { mode = \"trap\" }\n",
    )
    .unwrap();
    let plugins = hostile_dir().to_str().unwrap();
    let out = qflow(&["run", flow.to_str().unwrap(), "--json", "--plugins", plugins]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let summary = stdout_json(&out);
    assert_eq!(summary["status"], "failed");
    assert_eq!(summary["steps"][0]["status"], "failed");
    assert_eq!(summary["steps"][0]["error"]["kind"], "trap");
    let message = summary["steps"][0]["error"]["message"].as_str().unwrap();
    assert!(message.contains("step `boom` (plugin hostile)"), "{message}");
}

#[test]
fn an_invalid_flow_exits_two_naming_the_file_and_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let flow = dir.path().join("cyclic.toml");
    std::fs::write(
        &flow,
        "[flow]\nname = \"c\"\n[[step]]\nid = \"a\"\nplugin = \"identity\"\nneeds = [\"b\"]\n\
         [[step]]\nid = \"b\"\nplugin = \"identity\"\nneeds = [\"a\"]\n",
    )
    .unwrap();
    let out = qflow(&["run", flow.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("cyclic.toml") && err.contains("`a` -> `b`") && err.contains("cycle"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn plugins_list_describes_every_bundled_plugin() {
    let out = qflow(&["plugins", "list", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let list = stdout_json(&out);
    let kinds: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap().to_owned(), p["kind"].as_str().unwrap().to_owned()))
        .collect();
    for step in ["csv", "fib", "hash", "identity", "jq", "sleep", "template"] {
        assert!(kinds.contains(&(step.to_owned(), "step".to_owned())), "{kinds:?}");
    }
    assert!(kinds.contains(&("file-loader".to_owned(), "loader".to_owned())), "{kinds:?}");
}

#[test]
fn build_places_a_component_that_the_host_can_run() {
    let out_dir = tempfile::tempdir().unwrap();
    let out = qflow(&["build", "plugins/hash", "--out", out_dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(Path::new(&out_dir.path().join("hash.wasm")).is_file());
    let listed =
        qflow(&["plugins", "list", "--json", "--plugins", out_dir.path().to_str().unwrap()]);
    let list = stdout_json(&listed);
    assert_eq!(list[0]["name"], "hash");
    assert_eq!(list[0]["kind"], "step");
}

#[test]
fn build_of_a_directory_without_a_project_says_what_one_is() {
    let dir = tempfile::tempdir().unwrap();
    let out = qflow(&["build", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let said = stderr(&out);
    assert!(said.contains("no plugin project here (Cargo.toml for Rust"), "{said}");
    assert!(said.contains("qflow new NAME --lang rust|python|js"), "{said}");
}

#[test]
fn plan_shows_groups_and_the_critical_path() {
    let out = qflow(&["plan", "examples/orders-report.toml", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let plan = stdout_json(&out);
    assert_eq!(plan["groups"], serde_json::json!([["orders"], ["totals", "checksum"], ["report"]]));
    let critical: Vec<&str> =
        plan["critical_path"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert_eq!((critical[0], critical[2]), ("orders", "report"));
    assert!(plan["parallelization"].as_f64().unwrap() > 1.0);

    let text = qflow(&["plan", "examples/orders-report.toml"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("group 1: totals, checksum"), "{text}");
}

#[test]
fn ctrl_c_cancels_the_run_and_still_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let flow = dir.path().join("long.toml");
    std::fs::write(
        &flow,
        "[flow]\nname = \"long\"\n[[step]]\nid = \"nap\"\nplugin = \"sleep\"\nconfig = { ms = 30000 }\n\
         [[step]]\nid = \"after\"\nplugin = \"identity\"\nneeds = [\"nap\"]\n",
    )
    .unwrap();
    // The step's start is logged (debug): the signal comes while it runs,
    // however slowly the machine starts the process.
    let mut child = command(&["run", flow.to_str().unwrap(), "--json"])
        .env("QFLOW_LOG", "qflow=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr_lines = lines(child.stderr.take().unwrap());
    let stdout_lines = lines(child.stdout.take().unwrap());
    wait_for(&stderr_lines, "step nap started");
    let killed = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = exit_of(child);
    let rest: Vec<String> = stderr_lines.iter().collect();
    assert_eq!(status.code(), Some(130), "{rest:?}");
    assert!(rest.iter().any(|l| l.contains("interrupted")), "{rest:?}");
    let stdout: String = stdout_lines.iter().collect::<Vec<_>>().join("\n");
    let summary: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    // Cancelled, not succeeded: the run did not wait out the 30 s nap.
    assert_eq!(summary["status"], "cancelled");
    assert_eq!(summary["steps"][0]["status"], "cancelled");
    assert_eq!(summary["steps"][1]["status"], "skipped");
}

/// SIGTERM, as a service manager stops a process, is Ctrl-C's twin: the
/// run is cancelled, its summary printed, and the exit code says SIGTERM.
#[test]
fn sigterm_cancels_the_run_prints_its_summary_and_exits_143() {
    let dir = tempfile::tempdir().unwrap();
    let flow = dir.path().join("long.toml");
    std::fs::write(
        &flow,
        "[flow]\nname = \"long\"\n[[step]]\nid = \"nap\"\nplugin = \"sleep\"\nconfig = { ms = 30000 }\n",
    )
    .unwrap();
    let mut child = command(&["run", flow.to_str().unwrap()])
        .env("QFLOW_LOG", "qflow=debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr_lines = lines(child.stderr.take().unwrap());
    let stdout_lines = lines(child.stdout.take().unwrap());
    wait_for(&stderr_lines, "step nap started");
    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = exit_of(child);
    assert_eq!(status.code(), Some(143));
    let stdout: Vec<String> = stdout_lines.iter().collect();
    assert!(stdout.iter().any(|l| l.starts_with("⊘ nap")), "{stdout:?}");
    assert!(stdout.iter().any(|l| l.contains("flow long was cancelled")), "{stdout:?}");
}

/// A step stuck in a blocking call in the kernel (opening a FIFO nobody
/// writes) times out, and the process still exits: the stuck thread holds
/// neither the exit nor the exit code.
#[test]
fn a_step_stuck_in_the_kernel_times_out_and_the_process_still_exits() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let flow = dir.path().join("fifo.toml");
    std::fs::write(
        &flow,
        format!(
            "[flow]\nname = \"fifo\"\n[[step]]\nid = \"stuck\"\nplugin = \"hostile\"\n\
             timeout_ms = 1000\ndirs = {{ \"/p\" = {:?} }}\nconfig = {{ mode = \"fifo\", path = \"/p/pipe\" }}\n",
            dir.path()
        ),
    )
    .unwrap();
    let mut child = command(&["run", flow.to_str().unwrap()])
        .env("QFLOW_PLUGINS", hostile_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout_lines = lines(child.stdout.take().unwrap());
    let status = exit_of(child);
    assert_eq!(status.code(), Some(1));
    let stdout: Vec<String> = stdout_lines.iter().collect();
    assert!(stdout.iter().any(|l| l.contains("within its timeout of 1000 ms")), "{stdout:?}");
}

#[test]
fn an_input_file_over_the_limit_is_refused_without_reading_it_all() {
    let out = qflow(&["run", "examples/orders-report.toml", "--input", "@/dev/zero"]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("cannot read --input /dev/zero"), "{err}");
    assert!(err.contains("larger than the limit of 67108864 bytes"), "{err}");
}

/// Everything a plugin controls reaches the terminal escaped, one record a
/// line: its output, its error, its log lines. `--json` stays exact.
#[test]
fn plugin_text_cannot_drive_the_terminal_or_forge_a_line() {
    let dir = tempfile::tempdir().unwrap();
    let flow = dir.path().join("forge.toml");
    std::fs::write(
        &flow,
        "[flow]\nname = \"forge\"\nstrategy = \"continue-on-error\"\n\
         [[step]]\nid = \"out\"\nplugin = \"hostile\"\nconfig = { mode = \"escape-output\" }\n\
         [[step]]\nid = \"err\"\nplugin = \"hostile\"\nconfig = { mode = \"escape-error\" }\n",
    )
    .unwrap();
    let out = command(&["run", flow.to_str().unwrap()])
        .env("QFLOW_PLUGINS", hostile_dir())
        .env("QFLOW_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    for (name, stream) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
        let text = String::from_utf8_lossy(stream);
        for control in ['\u{1b}', '\u{7}', '\r'] {
            assert!(!text.contains(control), "{name} holds {control:?}:\n{text}");
        }
        assert!(text.contains("\\u{1b}]0;owned\\u{7}"), "{name}:\n{text}");
        // The forged status line is never a line of its own.
        assert!(!text.lines().any(|l| l.starts_with("✓ fake-step")), "{name}:\n{text}");
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.lines().any(|l| l.starts_with("│ ") && l.contains("fake-step")), "{stdout}");
    // The log line is marked with its step.
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.lines().any(|l| l.contains("[out] ") && l.contains("fake-step")), "{stderr}");

    let json = command(&["run", flow.to_str().unwrap(), "--json", "--outputs", "all"])
        .env("QFLOW_PLUGINS", hostile_dir())
        .output()
        .unwrap();
    let summary = stdout_json(&json);
    let forged = "\u{1b}]0;owned\u{7}\u{1b}[2J\r\n✓ fake-step      0.1 →      0.2 ms  identity";
    assert_eq!(summary["steps"][0]["output"], forged, "--json is exact");
    let message = summary["steps"][1]["error"]["message"].as_str().unwrap();
    assert!(message.contains(forged), "{message:?}");
}

/// 200 000 error lines with a 64 KiB budget: the operator's log gets what
/// the budget allows and one line saying how much was dropped.
#[test]
fn a_log_flood_reaches_the_operators_log_only_within_the_budget() {
    let dir = tempfile::tempdir().unwrap();
    let flow = dir.path().join("flood.toml");
    std::fs::write(
        &flow,
        "[flow]\nname = \"flood\"\nmax_log_bytes = 65536\n\
         [[step]]\nid = \"loud\"\nplugin = \"hostile\"\nconfig = { mode = \"log-error-flood\", count = 200000 }\n",
    )
    .unwrap();
    let out = command(&["run", flow.to_str().unwrap()])
        .env("QFLOW_PLUGINS", hostile_dir())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    // Each kept line costs its text and 64 bytes of the budget: ~900 lines.
    let forwarded = err.lines().filter(|l| l.contains("flood ")).count();
    assert!((500..=1100).contains(&forwarded), "{forwarded} lines forwarded");
    assert!(err.len() < 1 << 20, "{} bytes on stderr", err.len());
    assert!(err.contains("over the log budget were dropped"), "{}", &err[err.len() - 500..]);
}

/// Runs `qflow` to the end and returns its exit code and peak resident
/// memory in bytes, as the kernel counted it for that one process.
fn peak_memory(args: &[&str], plugins: &Path) -> (Option<i32>, u64) {
    // Waited for by wait4 below, which std cannot do.
    #[allow(clippy::zombie_processes)]
    let child = command(args)
        .env("QFLOW_PLUGINS", plugins)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = libc::pid_t::try_from(child.id()).unwrap();
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value of that plain C struct.
    #[allow(unsafe_code)]
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet waited for (the `Child` is
    // never waited on), and both pointers are to live locals.
    #[allow(unsafe_code)]
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4 failed");
    let code = libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status));
    // Linux counts ru_maxrss in KiB.
    (code, u64::try_from(usage.ru_maxrss).unwrap() * 1024)
}

/// A 15 MiB JSON array passed along a chain of five steps: the host keeps
/// outputs as text, shares each with the step that needs it, and keeps an
/// intermediate one only until that step has it. (As a tree, the array
/// alone cost ~240 MiB a step, and the chain 1.7 GiB.)
#[test]
fn a_large_output_passed_along_a_chain_costs_a_few_times_its_size() {
    let dir = tempfile::tempdir().unwrap();
    let chain = |bytes: u64| {
        let mut toml = format!(
            "[flow]\nname = \"chain\"\n[[step]]\nid = \"s0\"\nplugin = \"hostile\"\n\
             config = {{ mode = \"big-array\", bytes = {bytes} }}\n"
        );
        for i in 1..=5 {
            toml += &format!(
                "[[step]]\nid = \"s{i}\"\nplugin = \"hostile\"\nneeds = [\"s{}\"]\nconfig = {{ mode = \"ok\" }}\n",
                i - 1
            );
        }
        let path = dir.path().join(format!("chain-{bytes}.toml"));
        std::fs::write(&path, toml).unwrap();
        path
    };
    let (small, large) = (chain(100), chain(15 << 20));
    let run = |flow: &Path| peak_memory(&["run", flow.to_str().unwrap(), "--json"], hostile_dir());
    // Both measured with a warm cache: no compile in either.
    assert_eq!(run(&small).0, Some(0));
    let (code, baseline) = run(&small);
    assert_eq!(code, Some(0));
    let (code, peak) = run(&large);
    assert_eq!(code, Some(0));
    let grown = peak.saturating_sub(baseline);
    assert!(grown < 5 * (15 << 20), "the run grew by {} MiB over a tiny one", grown >> 20);
}

#[test]
fn watch_reruns_the_flow_when_its_plugin_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(plugins_dir().join("identity.wasm"), dir.path().join("swap.wasm")).unwrap();
    let flow = dir.path().join("swap.toml");
    std::fs::write(&flow, "[flow]\nname = \"swap\"\n[[step]]\nid = \"s\"\nplugin = \"swap\"\n")
        .unwrap();
    let mut child = command(&["watch", flow.to_str().unwrap(), "--json", "--input", "\"abc\""])
        .args(["--plugins", dir.path().to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rx = lines(child.stdout.take().unwrap());
    let next = || -> Value {
        let line = rx.recv_timeout(Duration::from_secs(60)).expect("a line from qflow watch");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    assert_eq!(next()["steps"][0]["output"], "abc", "the first run, on identity");
    let tmp = dir.path().join("swap.tmp");
    std::fs::copy(plugins_dir().join("hash.wasm"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.path().join("swap.wasm")).unwrap();
    assert_eq!(next()["type"], "q.qflow.plugin.reloaded.v1");
    assert_eq!(next()["steps"][0]["output"]["bytes"], 3, "the re-run, on hash");
    let killed = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    assert_eq!(exit_of(child).code(), Some(0));
}

#[test]
fn run_events_writes_the_runs_cloudevents_as_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let out = qflow(&[
        "run",
        "examples/orders-report.toml",
        "--json",
        "--events",
        events.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run_id = stdout_json(&out)["run_id"].as_str().unwrap().to_owned();
    let lines: Vec<Value> = std::fs::read_to_string(&events)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.first().unwrap()["type"], "q.qflow.run.started.v1");
    let count = |kind: &str| lines.iter().filter(|e| e["type"] == kind).count();
    // Started and finished for each of the four steps, each of the three
    // plan groups completed, each of the four plugins (and the loader's
    // one, loaded for the asset: not by the run) loaded.
    assert_eq!(count("q.qflow.step.started.v1"), 4, "{lines:?}");
    assert_eq!(count("q.qflow.step.finished.v1"), 4);
    assert_eq!(count("q.qflow.optimization.group.completed.v1"), 3);
    assert_eq!(count("q.qflow.optimization.lazy.loaded.v1"), 4);
    assert_eq!(count("q.qflow.run.finished.v1"), 1);
    for (n, event) in lines.iter().enumerate() {
        assert_eq!(event["specversion"], "1.0");
        assert_eq!(event["data"]["run_id"], run_id.as_str());
        assert_eq!(event["sequence"], n as u64 + 1);
    }
}

/// `qflow serve` for real: the optimization commands ask it over HTTP, and
/// SIGTERM stops it with exit 0.
#[test]
fn serve_answers_the_optimization_commands_and_stops_on_sigterm() {
    let flows = tempfile::tempdir().unwrap();
    std::fs::copy(repo().join("examples/fan-out.toml"), flows.path().join("fan-out.toml")).unwrap();
    let mut server =
        command(&["serve", "--addr", "127.0.0.1:0", "--flows", flows.path().to_str().unwrap()])
            .env("QFLOW_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
    let stderr_lines = lines(server.stderr.take().unwrap());
    let line = wait_for(&stderr_lines, "qflow serving on ");
    let url = line.rsplit("serving on ").next().unwrap().trim().to_owned();

    let out = qflow(&["optimization", "metrics", "--server", &url, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let metrics = stdout_json(&out);
    assert_eq!(metrics["optimizationEnabled"], true);
    assert!(metrics["resourcePools"]["wasm"]["totalResources"].is_u64(), "{metrics}");

    let out = qflow(&["optimization", "recommend", "fan-out", "--server", &url, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout_json(&out).is_array());
    let out = qflow(&[
        "optimization",
        "optimize",
        "fan-out",
        "--level",
        "conservative",
        "--server",
        &url,
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = qflow(&["optimization", "recommend", "no-such-flow", "--server", &url]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no flow `no-such-flow`"), "{}", stderr(&out));
    let out = qflow(&["optimization", "pools", "--server", &url]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("wasm pools:"), "{}", stderr(&out));

    let killed = Command::new("kill").args(["-TERM", &server.id().to_string()]).status().unwrap();
    assert!(killed.success());
    assert_eq!(exit_of(server).code(), Some(0));
}

#[test]
fn optimize_in_process_prints_a_diff_and_applies_it_with_a_backup() {
    let dir = tempfile::tempdir().unwrap();
    let flow = dir.path().join("redundant.toml");
    let text = "[flow]\nname = \"redundant\"\n[[step]]\nid = \"a\"\nplugin = \"identity\"\n\
                [[step]]\nid = \"b\"\nplugin = \"identity\"\nneeds = [\"a\"]\n\
                [[step]]\nid = \"c\"\nplugin = \"identity\"\nneeds = [\"b\", \"a\"]\ninput = \"${steps.b.output}\"\n";
    std::fs::write(&flow, text).unwrap();
    let path = flow.to_str().unwrap();
    let out = qflow(&["optimization", "recommend", path]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("redundant-dependency"),
        "{}",
        stderr(&out)
    );
    let out = qflow(&["optimization", "optimize", path, "--level", "conservative", "--apply"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed.contains("-needs = [\"b\", \"a\"]") && printed.contains("+needs = [\"b\"]"),
        "{printed}"
    );
    assert_eq!(std::fs::read_to_string(dir.path().join("redundant.toml.bak")).unwrap(), text);
    assert!(std::fs::read_to_string(&flow).unwrap().contains("needs = [\"b\"]\n"));
}

/// The run store across processes: a later `qflow` lists, shows and reruns
/// a run, and the in-process optimization commands count it.
#[test]
fn runs_are_kept_for_later_commands() {
    let data = tempfile::tempdir().unwrap();
    let with_data = |args: &[&str]| {
        let out = command(args).env("QFLOW_DATA_DIR", data.path()).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        stdout_json(&out)
    };
    let summary = with_data(&["run", "examples/orders-report.toml", "--json"]);
    let run_id = summary["run_id"].as_str().unwrap().to_owned();

    let listed = with_data(&["runs", "list", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["run_id"], run_id.as_str());
    assert_eq!(listed[0]["status"], "succeeded");
    let shown = with_data(&["runs", "show", &run_id, "--json"]);
    assert_eq!(shown["summary"]["steps"].as_array().unwrap().len(), 4);
    assert_eq!(shown["summary"]["steps"][0]["id"], "orders");

    let metrics = with_data(&["optimization", "metrics", "--json"]);
    assert_eq!(metrics["executionOptimization"]["runs"], 1, "{metrics}");

    let rerun = with_data(&["runs", "rerun", &run_id, "--json"]);
    assert_ne!(rerun["run_id"], run_id.as_str());
    assert_eq!(rerun["status"], "succeeded");
    let listed = with_data(&["runs", "list", "--flow", "orders-report", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(listed[0]["run_id"], rerun["run_id"], "the newest first");

    let missing = command(&["runs", "show", "no-such-run"])
        .env("QFLOW_DATA_DIR", data.path())
        .output()
        .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(stderr(&missing).contains("no run no-such-run"), "{}", stderr(&missing));
}

/// A process killed in the middle of a run: the next one to open the store
/// finds the finished run intact and the unfinished one interrupted.
#[test]
fn a_run_whose_process_was_killed_is_interrupted() {
    let data = tempfile::tempdir().unwrap();
    let flow = data.path().join("forever.toml");
    let toml = "[flow]\nname = \"forever\"\n[[step]]\nid = \"nap\"\nplugin = \"sleep\"\nconfig = { ms = 600000 }\n";
    std::fs::write(&flow, toml).unwrap();
    let with_data = |args: &[&str]| {
        let out = command(args).env("QFLOW_DATA_DIR", data.path()).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", stderr(&out));
        stdout_json(&out)
    };
    let finished = with_data(&["run", "examples/orders-report.toml", "--json"]);
    let mut child = command(&["run", flow.to_str().unwrap()])
        .env("QFLOW_DATA_DIR", data.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut running = Value::Null;
    for _ in 0..600 {
        running = with_data(&["runs", "list", "--status", "running", "--json"]);
        if !running.as_array().unwrap().is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(running[0]["flow"], "forever", "the run started: {running}");
    child.kill().unwrap();
    child.wait().unwrap();

    let listed = with_data(&["runs", "list", "--json"]);
    let state = |id: &Value| {
        listed.as_array().unwrap().iter().find(|r| r["run_id"] == *id).unwrap()["status"].clone()
    };
    assert_eq!(state(&running[0]["run_id"]), "interrupted", "{listed}");
    assert_eq!(state(&finished["run_id"]), "succeeded", "{listed}");
}

/// The server killed (SIGKILL) in the middle of 200 runs: the next one on
/// the same store has every run it had accepted, each finished run intact,
/// every unfinished one interrupted.
#[test]
fn a_server_killed_mid_runs_loses_nothing_it_accepted() {
    let (data, flows) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::write(
        flows.path().join("nap.toml"),
        "[flow]\nname = \"nap\"\n[[step]]\nid = \"nap\"\nplugin = \"sleep\"\n",
    )
    .unwrap();
    let server = Server::start(data.path(), flows.path(), plugins_dir());
    let url = server.url.clone();
    let mut accepted = Vec::new();
    for n in 0..200 {
        // Even runs end at once; odd ones would take a minute.
        let ms = if n % 2 == 0 { 0 } else { 60_000 };
        let (status, body) = http(
            &url,
            "POST",
            "/api/v1/flows/nap/runs",
            Some(&serde_json::json!({"input": {"ms": ms, "n": n}})),
        );
        assert_eq!(status, 202, "{body}");
        accepted.push((body["run_id"].as_str().unwrap().to_owned(), ms));
    }
    // Wait (a generous minute at most) until the quick ones have ended.
    let mut finished = Vec::new();
    for _ in 0..600 {
        let (_, page) = http(&url, "GET", "/api/v1/runs?status=succeeded&limit=1000", None);
        finished = page
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["run_id"].as_str().unwrap().to_owned())
            .collect();
        if finished.len() >= 100 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(finished.len(), 100, "the quick runs ended");
    server.kill();

    let again = Server::start(data.path(), flows.path(), plugins_dir());
    let url = again.url.clone();
    for (run_id, ms) in &accepted {
        let (status, record) = http(&url, "GET", &format!("/api/v1/runs/{run_id}"), None);
        assert_eq!(status, 200, "run {run_id} was accepted, then lost: {record}");
        if finished.contains(run_id) || *ms == 0 {
            assert_eq!(record["status"], "succeeded", "{record}");
            assert_eq!(record["summary"]["steps"][0]["status"], "succeeded", "{record}");
        } else {
            assert_eq!(record["status"], "interrupted", "{record}");
            assert!(record.get("summary").is_none(), "{record}");
        }
    }
    again.kill();
}

/// `qflow run` with a step fetching from a loopback server: granted, it
/// gets the body; `--http-max-response-bytes` below the body's size fails
/// the step naming the limit; a zero `--http-timeout` is refused.
#[test]
fn run_fetches_over_http_within_the_limits_given() {
    let server = qflow_tests::HttpServer::start();
    let dir = tempfile::tempdir().unwrap();
    let flow = dir.path().join("fetch.toml");
    std::fs::write(
        &flow,
        format!(
            "[flow]\nname = \"fetch\"\n[[step]]\nid = \"get\"\nplugin = \"http-get\"\n\
             config = {{ url = \"http://127.0.0.1:{port}/json\" }}\nhttp = [\"127.0.0.1:{port}\"]\n",
            port = server.port
        ),
    )
    .unwrap();
    let flow = flow.to_str().unwrap();
    let out = qflow(&["run", flow, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let summary = stdout_json(&out);
    assert_eq!(summary["steps"][0]["output"], serde_json::json!({"status": 200, "body": {"n": 1}}));

    let out = qflow(&["run", flow, "--json", "--http-max-response-bytes", "4"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let message = stdout_json(&out)["steps"][0]["error"]["message"].to_string();
    assert!(message.contains("limit") && message.contains("4 bytes"), "{message}");

    let out = qflow(&["run", flow, "--http-timeout", "0s"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--http-timeout must be more than 0"), "{}", stderr(&out));
}

#[test]
fn the_sqlite_example_fetches_filters_and_stores_orders() {
    let server = qflow_tests::HttpServer::start();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    // The example as shipped, pointed at this test's server.
    let example = std::fs::read_to_string(repo().join("examples/orders-to-sqlite.toml")).unwrap();
    let flow = dir.path().join("orders-to-sqlite.toml");
    std::fs::write(&flow, example.replace("8089", &server.port.to_string())).unwrap();
    let flow = flow.to_str().unwrap();
    for _ in 0..2 {
        // Twice: the second run updates the rows the first one wrote.
        let out = qflow(&["run", flow, "--json", "--outputs", "all"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        let summary = stdout_json(&out);
        let output = |id: &str| {
            let steps = summary["steps"].as_array().unwrap();
            steps.iter().find(|s| s["id"] == id).unwrap()["output"].clone()
        };
        assert_eq!(output("store"), serde_json::json!({"rows_affected": 6}));
        assert_eq!(
            output("by_region"),
            serde_json::json!([
                {"region": "east", "orders": 2, "revenue": 19200.0},
                {"region": "north", "orders": 2, "revenue": 2230.0},
                {"region": "south", "orders": 2, "revenue": 1070.75},
            ])
        );
    }
    assert!(dir.path().join("data/orders.db").is_file(), "beside the flow, as its url says");
}

#[test]
fn databases_given_on_the_command_line_are_granted_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("shop.db");
    let flow = dir.path().join("shop.toml");
    std::fs::write(
        &flow,
        "[flow]\nname = \"shop\"\n[[step]]\nid = \"add\"\nplugin = \"sql\"\ndatabases = [\"shop\"]\n\
         config = { db = \"shop\", setup = [\"CREATE TABLE IF NOT EXISTS items (name TEXT)\"], \
         statement = \"INSERT INTO items (name) VALUES ($1)\" }\n",
    )
    .unwrap();
    let (flow, url) = (flow.to_str().unwrap(), format!("shop=sqlite:{}", db.display()));
    let out = qflow(&["run", flow, "--json", "--input", "[\"tea\"]", "--database", &url]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(stdout_json(&out)["steps"][0]["output"], serde_json::json!({"rows_affected": 1}));

    // Read-only, the same statement is refused, naming the grant.
    let out =
        qflow(&["run", flow, "--json", "--input", "[\"milk\"]", "--read-only-database", &url]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let error = &stdout_json(&out)["steps"][0]["error"];
    assert_eq!(error["code"], "bad-config", "{error}");
    assert!(error["message"].to_string().contains("granted read-only"), "{error}");

    // Not given at all: refused before anything runs, naming the step.
    let out = qflow(&["run", flow]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("step `add`: no database `shop`"), "{}", stderr(&out));
    let out = qflow(&["run", flow, "--database", "s/hop=sqlite:x.db"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("is not a database id"), "{}", stderr(&out));
}
