//! The scheduler, through a fake invoker under tokio's paused clock.

use std::path::Path;

use serde_json::json;

use super::*;
use crate::model::Format;

fn flow() -> Flow {
    let toml = r#"
        [flow]
        name = "inputs"
        [[step]]
        id = "a"
        plugin = "x"
        [[step]]
        id = "b"
        plugin = "x"
        needs = ["a"]
        [[step]]
        id = "c"
        plugin = "x"
        needs = ["a", "b"]
        [[step]]
        id = "d"
        plugin = "x"
        needs = ["b"]
        input = { from_a = "${steps.b.output.n}", all = "${input}" }
    "#;
    Flow::parse(toml, Format::Toml, "<test>", Path::new(".")).unwrap()
}

#[test]
fn default_inputs_follow_the_dependencies() {
    let flow = flow();
    let input = json!({"flow": "input"});
    let input_json = Json::from_value(&input);
    let outputs = [Some(Json::from(json!("A"))), Some(json!({"n": 2}).into()), None, None];
    let output_of = |i: usize| outputs[i].as_ref();
    let resolve = |i| resolve_input(&flow, i, &input_json, Some(&input), &output_of).unwrap();
    assert!(resolve(0).shares(&input_json), "no dependencies: the flow's input, shared");
    let one = resolve(1);
    assert!(one.shares(outputs[0].as_ref().unwrap()), "one dependency: its output, shared");
    assert_eq!(resolve(2).value(), json!({"a": "A", "b": {"n": 2}}), "several: keyed by id");
    assert_eq!(resolve(3).value(), json!({"from_a": 2, "all": {"flow": "input"}}), "a mapping");
}

#[test]
fn the_plan_orders_dependencies_first() {
    let flow = flow();
    let plan = Plan::new(&flow);
    let pos = |id: &str| plan.order.iter().position(|x| x == id).unwrap();
    assert!(pos("a") < pos("b") && pos("b") < pos("c") && pos("b") < pos("d"));
    assert_eq!(plan.dependents[0], vec![1, 2]);
    assert_eq!(plan.dependents[1], vec![2, 3]);
}

/// What the fake does for a step.
#[derive(Clone, Copy)]
enum Act {
    /// Takes this long, then returns `{"step": id, "input": input}`.
    Succeed(u64),
    /// Takes this long, then fails.
    Fail { ms: u64, retryable: bool },
    /// Fails (retryably) this many times, then succeeds; each attempt takes `ms`.
    Flaky { times: u32, ms: u64 },
    /// Never returns by itself: interrupted at its deadline (a trap, as a
    /// guest is), or cut.
    Hang,
    /// Its plugin cannot be loaded.
    NoPlugin,
    /// Preparing it takes `load` ms, readying an instance `ready` ms, its
    /// run `ms`.
    Slow { load: u64, ready: u64, ms: u64 },
}

/// A fake invoker: each step does what its `Act` says on tokio's clock, and
/// the fake records when every attempt ran.
struct Fake {
    flow: Arc<Flow>,
    acts: HashMap<String, Act>,
    started: Instant,
    attempts: std::sync::Mutex<Vec<u32>>,
    /// (step, start ms, end ms) of every attempt that ended by itself.
    trace: std::sync::Mutex<Vec<(String, f64, f64)>>,
}

impl Fake {
    fn new(flow: &Arc<Flow>, acts: &[(&str, Act)]) -> Arc<Fake> {
        Arc::new(Fake {
            flow: flow.clone(),
            acts: acts.iter().map(|(id, act)| ((*id).to_owned(), *act)).collect(),
            started: Instant::now(),
            attempts: std::sync::Mutex::new(vec![0; flow.steps.len()]),
            trace: std::sync::Mutex::default(),
        })
    }

    fn act(&self, index: usize) -> Act {
        self.acts.get(&self.flow.steps[index].id).copied().unwrap_or(Act::Succeed(10))
    }

    fn ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1e3
    }
}

impl StepInvoker for Fake {
    async fn prepare(&self, index: usize) -> Result<(), StepFailure> {
        match self.act(index) {
            Act::NoPlugin => Err(failure(&self.flow.steps[index], FailureKind::Plugin, "missing")),
            Act::Slow { load, .. } => {
                tokio::time::sleep(Duration::from_millis(load)).await;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    async fn invoke(&self, index: usize, input: &Json, deadline: Option<Instant>) -> Attempt {
        let step = &self.flow.steps[index];
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap();
            attempts[index] += 1;
            attempts[index]
        };
        let start = self.ms();
        let sleep = |ms| tokio::time::sleep(Duration::from_millis(ms));
        let mut ready = Duration::ZERO;
        let result = match self.act(index) {
            Act::Slow { ready: took, ms, .. } => {
                sleep(took).await;
                ready = Duration::from_millis(took);
                sleep(ms).await;
                Ok(Json::from(json!(null)))
            }
            Act::Succeed(ms) => {
                sleep(ms).await;
                Ok(Json::from(json!({"step": step.id, "input": input.value()})))
            }
            Act::Fail { ms, retryable } => {
                sleep(ms).await;
                Err(failure(step, FailureKind::StepError, "failed").retryable(retryable))
            }
            Act::Flaky { times, ms } => {
                sleep(ms).await;
                if attempt <= times {
                    Err(failure(step, FailureKind::StepError, "flaky").retryable(true))
                } else {
                    Ok(Json::from(json!(attempt)))
                }
            }
            Act::Hang | Act::NoPlugin => match deadline {
                Some(deadline) => {
                    tokio::time::sleep_until(deadline).await;
                    Err(failure(step, FailureKind::Trap, "interrupted"))
                }
                None => std::future::pending().await,
            },
        };
        self.trace.lock().unwrap().push((step.id.clone(), start, self.ms()));
        Attempt { result, log: StepLog::default(), ready }
    }
}

fn parse(toml: &str) -> Arc<Flow> {
    Arc::new(Flow::parse(toml, Format::Toml, "<test>", Path::new(".")).unwrap())
}

/// `n` independent steps `s0`, `s1`, … after the header.
fn wide(header: &str, n: usize) -> Arc<Flow> {
    let mut toml = format!("[flow]\nname = \"wide\"\n{header}\n");
    for i in 0..n {
        toml += &format!("[[step]]\nid = \"s{i}\"\nplugin = \"x\"\n");
    }
    parse(&toml)
}

async fn run_fake(flow: &Arc<Flow>, fake: &Arc<Fake>, options: RunOptions) -> RunSummary {
    let bus = crate::model::EventBus::new();
    let plan = Plan::new(flow);
    let events = bus.emitter("/test".into());
    run(Arc::from("run"), flow.clone(), &plan, json!({"in": 1}), options, fake.clone(), events)
        .await
}

fn span(summary: &RunSummary, id: &str) -> (f64, f64) {
    let step = summary.step(id).unwrap();
    (step.start_ms.unwrap(), step.end_ms.unwrap())
}

fn status(summary: &RunSummary, id: &str) -> StepStatus {
    summary.step(id).unwrap().status
}

#[tokio::test(start_paused = true)]
async fn a_dependent_starts_the_moment_its_dependencies_end_and_gets_their_outputs() {
    let flow = parse(
        r#"
        [flow]
        name = "diamond"
        [[step]]
        id = "a"
        plugin = "x"
        [[step]]
        id = "b"
        plugin = "x"
        needs = ["a"]
        [[step]]
        id = "c"
        plugin = "x"
        needs = ["a"]
        [[step]]
        id = "d"
        plugin = "x"
        needs = ["b", "c"]
        "#,
    );
    let fake = Fake::new(
        &flow,
        &[
            ("a", Act::Succeed(100)),
            ("b", Act::Succeed(50)),
            ("c", Act::Succeed(200)),
            ("d", Act::Succeed(10)),
        ],
    );
    let summary = run_fake(&flow, &fake, RunOptions::new()).await;
    assert_eq!(summary.status, RunStatus::Succeeded);
    assert_eq!(span(&summary, "a"), (0.0, 100.0));
    assert_eq!(span(&summary, "b"), (100.0, 150.0), "b and c overlap");
    assert_eq!(span(&summary, "c"), (100.0, 300.0));
    assert_eq!(span(&summary, "d"), (300.0, 310.0), "d waits for the slower of b and c");
    assert_eq!(summary.wall_ms, 310.0);
    assert_eq!(summary.step_ms, 360.0);
    assert_eq!(summary.efficiency, 1.0, "the critical path a-c-d is the wall time");
    let d_input = &summary.output("d").unwrap()["input"];
    assert_eq!(d_input["b"]["step"], "b");
    assert_eq!(d_input["c"]["input"]["step"], "a", "c got a's output");
    assert_eq!(summary.output("a").unwrap()["input"], json!({"in": 1}));
}

#[tokio::test(start_paused = true)]
async fn max_parallel_bounds_the_steps_at_once_exactly() {
    let flow = wide("max_parallel = 2", 6);
    let acts: Vec<(String, Act)> = (0..6).map(|i| (format!("s{i}"), Act::Succeed(100))).collect();
    let acts: Vec<(&str, Act)> = acts.iter().map(|(id, a)| (id.as_str(), *a)).collect();
    let fake = Fake::new(&flow, &acts);
    let summary = run_fake(&flow, &fake, RunOptions::new()).await;
    assert_eq!(summary.max_parallel, 2);
    assert_eq!(summary.wall_ms, 300.0, "three rounds of two");
    for i in 0..6 {
        let (start, _) = span(&summary, &format!("s{i}"));
        assert_eq!(start, 100.0 * (i / 2) as f64, "s{i}: flow order among equals");
    }
    assert_eq!(summary.efficiency, 1.0, "600 ms of work over 2 slots in 300 ms");

    // The caller's limit overrides the flow's: all six at once.
    let fake = Fake::new(&flow, &acts);
    let summary = run_fake(&flow, &fake, RunOptions::new().max_parallel(6)).await;
    assert_eq!((summary.max_parallel, summary.wall_ms), (6, 100.0));
}

#[tokio::test(start_paused = true)]
async fn steps_sharing_a_resource_never_overlap_and_free_ones_do() {
    let flow = parse(
        r#"
        [flow]
        name = "db"
        [[step]]
        id = "w1"
        plugin = "x"
        resources = ["db"]
        [[step]]
        id = "w2"
        plugin = "x"
        resources = ["db", "disk"]
        [[step]]
        id = "w3"
        plugin = "x"
        resources = ["db"]
        [[step]]
        id = "free"
        plugin = "x"
        "#,
    );
    let fake = Fake::new(
        &flow,
        &[
            ("w1", Act::Succeed(150)),
            ("w2", Act::Succeed(150)),
            ("w3", Act::Succeed(150)),
            ("free", Act::Succeed(150)),
        ],
    );
    let summary = run_fake(&flow, &fake, RunOptions::new()).await;
    let mut spans: Vec<(f64, f64)> = ["w1", "w2", "w3"].iter().map(|w| span(&summary, w)).collect();
    spans.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(spans, vec![(0.0, 150.0), (150.0, 300.0), (300.0, 450.0)]);
    assert_eq!(span(&summary, "free"), (0.0, 150.0));
    assert_eq!(summary.wall_ms, 450.0);
}

#[tokio::test(start_paused = true)]
async fn the_longest_critical_path_starts_first() {
    let flow = parse(
        r#"
        [flow]
        name = "priority"
        max_parallel = 1
        [[step]]
        id = "short"
        plugin = "x"
        [[step]]
        id = "long1"
        plugin = "x"
        [[step]]
        id = "long2"
        plugin = "x"
        needs = ["long1"]
        "#,
    );
    let fake = Fake::new(&flow, &[]);
    let summary = run_fake(&flow, &fake, RunOptions::new()).await;
    assert_eq!(span(&summary, "long1"), (0.0, 10.0));
    assert_eq!(span(&summary, "short").0, 10.0, "ready first, but on the shorter path");
    assert_eq!(summary.plan.critical_path, vec!["long1", "long2"]);
}

#[tokio::test(start_paused = true)]
async fn fail_fast_cuts_the_running_steps_and_skips_the_rest() {
    let flow = parse(
        r#"
        [flow]
        name = "fail-fast"
        [[step]]
        id = "bad"
        plugin = "x"
        [[step]]
        id = "slow"
        plugin = "x"
        [[step]]
        id = "after"
        plugin = "x"
        needs = ["slow"]
        "#,
    );
    let fake = Fake::new(
        &flow,
        &[("bad", Act::Fail { ms: 50, retryable: true }), ("slow", Act::Succeed(1000))],
    );
    let summary = run_fake(&flow, &fake, RunOptions::new()).await;
    assert_eq!(summary.status, RunStatus::Failed);
    assert_eq!(status(&summary, "bad"), StepStatus::Failed);
    assert_eq!(status(&summary, "slow"), StepStatus::Cancelled);
    assert_eq!(status(&summary, "after"), StepStatus::Skipped);
    assert_eq!(summary.wall_ms, 50.0, "the failure ended the run at once");
    let bad = summary.step("bad").unwrap();
    assert_eq!(bad.attempts, 1, "fail-fast does not retry, retryable or not");
    assert_eq!(bad.error.as_ref().unwrap().kind, FailureKind::StepError);
}

#[tokio::test(start_paused = true)]
async fn continue_on_error_runs_every_step_whose_dependencies_succeeded() {
    let flow = parse(
        r#"
        [flow]
        name = "continue"
        strategy = "continue-on-error"
        [[step]]
        id = "bad"
        plugin = "x"
        [[step]]
        id = "after-bad"
        plugin = "x"
        needs = ["bad"]
        [[step]]
        id = "slow"
        plugin = "x"
        [[step]]
        id = "after-slow"
        plugin = "x"
        needs = ["slow"]
        "#,
    );
    let fake = Fake::new(
        &flow,
        &[("bad", Act::Fail { ms: 10, retryable: false }), ("slow", Act::Succeed(200))],
    );
    let summary = run_fake(&flow, &fake, RunOptions::new()).await;
    assert_eq!(summary.status, RunStatus::Failed);
    assert_eq!(status(&summary, "bad"), StepStatus::Failed);
    assert_eq!(status(&summary, "after-bad"), StepStatus::Skipped);
    assert_eq!(status(&summary, "slow"), StepStatus::Succeeded);
    assert_eq!(span(&summary, "after-slow"), (200.0, 210.0));
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_exponentially_with_equal_jitter() {
    let flow = parse(
        r#"
        [flow]
        name = "retry"
        strategy = "retry-failed"
        retry = { max_attempts = 4, backoff_ms = 1000, max_backoff_ms = 3000 }
        [[step]]
        id = "flaky"
        plugin = "x"
        [[step]]
        id = "recovers"
        plugin = "x"
        [[step]]
        id = "broken"
        plugin = "x"
        strategy = "continue-on-error"
        "#,
    );
    let bus = crate::model::EventBus::new();
    let mut events = bus.subscribe();
    let fake = Fake::new(
        &flow,
        &[
            ("flaky", Act::Flaky { times: 10, ms: 5 }),
            ("recovers", Act::Flaky { times: 1, ms: 5 }),
            ("broken", Act::Fail { ms: 5, retryable: false }),
        ],
    );
    let plan = Plan::new(&flow);
    let summary = run(
        Arc::from("r"),
        flow.clone(),
        &plan,
        json!(null),
        RunOptions::new(),
        fake.clone(),
        bus.emitter("/t".into()),
    )
    .await;
    let flaky = summary.step("flaky").unwrap();
    assert_eq!((flaky.status, flaky.attempts), (StepStatus::Failed, 4));
    assert!(flaky.error.as_ref().unwrap().retryable);
    let recovers = summary.step("recovers").unwrap();
    assert_eq!((recovers.status, recovers.attempts), (StepStatus::Succeeded, 2));
    assert_eq!(summary.output("recovers"), Some(json!(2)));
    assert_eq!(summary.step("broken").unwrap().attempts, 1, "not retryable: one attempt");

    let mut delays = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let EventData::StepRetrying { step, attempt, delay_ms, .. } = event.data
            && &*step == "flaky"
        {
            delays.push((attempt, delay_ms));
        }
    }
    // Each delay is between half and all of min(1000 * 2^k, 3000).
    let bounds = [(2, 500, 1000), (3, 1000, 2000), (4, 1500, 3000)];
    assert_eq!(delays.len(), 3, "{delays:?}");
    for ((attempt, delay), (want, low, high)) in delays.iter().zip(bounds) {
        assert_eq!(*attempt, want);
        assert!((low..=high).contains(delay), "retry {attempt} after {delay} ms");
    }
    // On the paused clock the step took exactly its attempts and its waits.
    let waited: u64 = delays.iter().map(|(_, d)| d).sum();
    // (Exact up to the float arithmetic of ms since the run began.)
    let took = flaky.duration_ms().unwrap();
    assert!((took - (waited + 4 * 5) as f64).abs() < 1e-6, "{took} ms for {waited} ms of waits");
}

#[tokio::test(start_paused = true)]
async fn a_timeout_interrupts_the_attempt_and_is_retried() {
    let flow = parse(
        r#"
        [flow]
        name = "loop"
        [[step]]
        id = "spin"
        plugin = "x"
        timeout_ms = 150
        retry = { max_attempts = 2, backoff_ms = 10, max_backoff_ms = 10 }
        "#,
    );
    let fake = Fake::new(&flow, &[("spin", Act::Hang)]);
    let summary = run_fake(&flow, &fake, RunOptions::new()).await;
    let spin = summary.step("spin").unwrap();
    assert_eq!(spin.attempts, 2);
    let error = spin.error.as_ref().unwrap();
    assert_eq!(error.kind, FailureKind::Timeout);
    assert!(error.message.contains("within its timeout of 150 ms"), "{}", error.message);
    // Two attempts of 150 ms and a 5–10 ms backoff between them.
    let took = spin.duration_ms().unwrap();
    assert!((305.0..=310.0).contains(&took), "{took}");
}

#[tokio::test(start_paused = true)]
async fn cancelling_cuts_running_steps_and_skips_the_rest() {
    let flow = parse(
        r#"
        [flow]
        name = "cut"
        [[step]]
        id = "spin"
        plugin = "x"
        [[step]]
        id = "nap"
        plugin = "x"
        [[step]]
        id = "later"
        plugin = "x"
        needs = ["nap"]
        [[step]]
        id = "quick"
        plugin = "x"
        "#,
    );
    let fake = Fake::new(
        &flow,
        &[("spin", Act::Hang), ("nap", Act::Succeed(10_000)), ("quick", Act::Succeed(100))],
    );
    let cancel = CancellationToken::new();
    let canceller = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(500)).await;
            cancel.cancel();
        })
    };
    let summary = run_fake(&flow, &fake, RunOptions::new().cancel(cancel)).await;
    canceller.await.unwrap();
    assert_eq!(summary.status, RunStatus::Cancelled);
    assert_eq!(status(&summary, "spin"), StepStatus::Cancelled);
    assert_eq!(status(&summary, "nap"), StepStatus::Cancelled);
    assert_eq!(status(&summary, "later"), StepStatus::Skipped);
    assert_eq!(status(&summary, "quick"), StepStatus::Succeeded);
    assert_eq!(summary.wall_ms, 500.0);
    let traced: Vec<String> = fake.trace.lock().unwrap().iter().map(|t| t.0.clone()).collect();
    assert_eq!(traced, vec!["quick"], "no cut attempt ran on to its end");
}

#[tokio::test(start_paused = true)]
async fn a_plugin_that_cannot_be_loaded_fails_its_step_without_an_attempt() {
    let flow = wide("strategy = \"retry-failed\"", 2);
    let fake = Fake::new(&flow, &[("s0", Act::NoPlugin), ("s1", Act::Succeed(1000))]);
    let summary = run_fake(&flow, &fake, RunOptions::new()).await;
    let s0 = summary.step("s0").unwrap();
    assert_eq!((s0.status, s0.attempts), (StepStatus::Failed, 1));
    assert_eq!(s0.error.as_ref().unwrap().kind, FailureKind::Plugin);
    assert_eq!(fake.attempts.lock().unwrap()[0], 0, "never invoked");
    assert_eq!(status(&summary, "s1"), StepStatus::Cancelled, "then fail-fast");
}

#[tokio::test(start_paused = true)]
async fn the_run_reports_its_events_in_order() {
    let flow = wide("", 2);
    let fake = Fake::new(&flow, &[]);
    let bus = crate::model::EventBus::new();
    let mut events = bus.subscribe();
    let plan = Plan::new(&flow);
    let summary = run(
        Arc::from("r1"),
        flow.clone(),
        &plan,
        json!(null),
        RunOptions::new(),
        fake,
        bus.emitter("/qflow/runs/r1".into()),
    )
    .await;
    let mut kinds = Vec::new();
    while let Ok(event) = events.try_recv() {
        assert_eq!(event.data.run_id(), Some("r1"));
        kinds.push((event.sequence, event.data.kind()));
    }
    assert_eq!(kinds.first(), Some(&(1, "q.qflow.run.started.v1")));
    // Two steps started and finished, their one group completed, the run finished.
    assert_eq!(kinds.last(), Some(&(7, "q.qflow.run.finished.v1")));
    let sequences: Vec<u64> = kinds.iter().map(|k| k.0).collect();
    assert_eq!(sequences, vec![1, 2, 3, 4, 5, 6, 7]);
    let groups = kinds.iter().filter(|k| k.1 == "q.qflow.optimization.group.completed.v1");
    assert_eq!(groups.count(), 1);
    assert_eq!(summary.run_id, "r1");
}

/// An invoker that records, around a [`Fake`], when the scheduler starts it
/// and prepares its steps, with the events announced by then.
struct Probe {
    fake: Arc<Fake>,
    events: std::sync::Mutex<tokio::sync::broadcast::Receiver<crate::model::Event>>,
    calls: std::sync::Mutex<Vec<String>>,
}

impl Probe {
    fn record(&self, call: &str) {
        let mut events = self.events.lock().unwrap();
        let mut calls = self.calls.lock().unwrap();
        while let Ok(event) = events.try_recv() {
            calls.push(event.data.kind().to_owned());
        }
        calls.push(call.to_owned());
    }
}

impl StepInvoker for Probe {
    fn start(&self) {
        self.record("start");
    }

    async fn prepare(&self, index: usize) -> Result<(), StepFailure> {
        self.record("prepare");
        self.fake.prepare(index).await
    }

    async fn invoke(&self, index: usize, input: &Json, deadline: Option<Instant>) -> Attempt {
        self.fake.invoke(index, input, deadline).await
    }
}

/// The invoker begins its loads (which announce themselves) only after the
/// run is announced, and before any step is prepared: a run's first event
/// is always its start.
#[tokio::test(start_paused = true)]
async fn the_invoker_starts_once_after_the_run_is_announced() {
    let flow = wide("", 2);
    let bus = crate::model::EventBus::new();
    let probe = Arc::new(Probe {
        fake: Fake::new(&flow, &[]),
        events: std::sync::Mutex::new(bus.subscribe()),
        calls: std::sync::Mutex::default(),
    });
    let plan = Plan::new(&flow);
    let events = bus.emitter("/qflow/runs/r".into());
    run(Arc::from("r"), flow.clone(), &plan, json!(null), RunOptions::new(), probe.clone(), events)
        .await;
    let calls = probe.calls.lock().unwrap().clone();
    assert_eq!(calls[..2], ["q.qflow.run.started.v1", "start"], "{calls:?}");
    assert_eq!(calls.iter().filter(|c| *c == "start").count(), 1, "{calls:?}");
    let first_prepare = calls.iter().position(|c| c == "prepare").unwrap();
    assert!(first_prepare > 1, "{calls:?}");
}

/// The run's own timeout: the step still running fails with a timeout (its
/// end announced once), the rest are skipped, and the run fails.
#[tokio::test(start_paused = true)]
async fn the_runs_timeout_fails_the_running_step_once_and_skips_the_rest() {
    let flow = parse(
        "[flow]\nname = \"late\"\n[[step]]\nid = \"a\"\nplugin = \"x\"\n\
         [[step]]\nid = \"b\"\nplugin = \"x\"\nneeds = [\"a\"]\n",
    );
    let fake = Fake::new(&flow, &[("a", Act::Hang)]);
    let bus = crate::model::EventBus::new();
    let mut events = bus.subscribe();
    let options = RunOptions::new().run_timeout(Duration::from_millis(500));
    let plan = Plan::new(&flow);
    let summary = run(
        Arc::from("r"),
        flow.clone(),
        &plan,
        json!(1),
        options,
        fake.clone(),
        bus.emitter("/r".into()),
    )
    .await;
    assert_eq!(summary.status, RunStatus::Failed);
    let a = summary.step("a").unwrap();
    assert_eq!((a.status, a.start_ms, a.end_ms), (StepStatus::Failed, Some(0.0), Some(500.0)));
    let error = a.error.as_ref().unwrap();
    assert_eq!(error.kind, FailureKind::Timeout);
    assert!(error.message.contains("cut by the run's timeout of 500 ms"), "{}", error.message);
    assert_eq!(status(&summary, "b"), StepStatus::Skipped);
    let mut finished = Vec::new();
    while let Ok(event) = events.try_recv() {
        if let EventData::StepFinished { step, .. } = event.data {
            finished.push(step.to_string());
        }
    }
    assert_eq!(finished, ["a", "b"], "each step's end announced once");
}

/// A step's report splits its time: the load phase (preparing it, readying
/// its first instance) and its own run.
#[tokio::test(start_paused = true)]
async fn a_report_splits_load_time_from_run_time() {
    let flow = wide("", 2);
    let fake = Fake::new(&flow, &[("s0", Act::Slow { load: 300, ready: 20, ms: 5 })]);
    let summary = run_fake(&flow, &fake, RunOptions::default()).await;
    let step = &summary.steps[0];
    assert_eq!(step.load_ms, Some(320.0));
    assert_eq!(step.run_ms, Some(5.0));
    assert_eq!(step.end_ms.zip(step.start_ms).map(|(end, start)| end - start), Some(325.0));
    // A step that loads nothing still says so.
    assert_eq!(summary.steps[1].load_ms, Some(0.0));
    assert_eq!(summary.steps[1].run_ms, Some(10.0));
}
