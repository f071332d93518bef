//! A plugin that misbehaves on purpose, as its config's `mode` says. Qflow's
//! tests run it to prove that one bad step fails alone, with a clear error,
//! and that the host keeps running. It implements the `step` world by hand
//! (not through the SDK's `Step`), so it can break the contract.

use qflow_sdk::serde_json::{self, Value};
use qflow_sdk::step_bindings::{Guest, PluginInfo, StepError};

struct Hostile;

thread_local! {
    static MODE: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
    static CONFIG: std::cell::RefCell<Value> = const { std::cell::RefCell::new(Value::Null) };
    static CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

impl Guest for Hostile {
    fn describe() -> PluginInfo {
        qflow_sdk::__private::info(
            qflow_sdk::__private::PluginKind::Step,
            "hostile",
            env!("CARGO_PKG_VERSION"),
            "Misbehaves on purpose; for tests only",
            &[],
            &[],
        )
    }

    fn init(config: String) -> Result<(), StepError> {
        let config: Value = serde_json::from_str(&config).unwrap_or_default();
        let mode = config.get("mode").and_then(Value::as_str).unwrap_or("ok").to_owned();
        if mode == "trap-in-init" {
            panic!("hostile: trapping in init");
        }
        // Real work in init, as a plugin that parses or loads something does.
        if let Some(ms) = config.get("init_spin_ms").and_then(Value::as_u64) {
            let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
            while std::time::Instant::now() < until {
                std::hint::black_box(());
            }
        }
        MODE.with(|m| *m.borrow_mut() = mode);
        CONFIG.with(|c| *c.borrow_mut() = config);
        Ok(())
    }

    fn run(input: String) -> Result<String, StepError> {
        match MODE.with(|m| m.borrow().clone()).as_str() {
            "ok" => Ok(input),
            // How many calls this instance has served, itself included; traps
            // when the input says `"trap": true`.
            "counter" => {
                let calls = CALLS.with(|c| {
                    c.set(c.get() + 1);
                    c.get()
                });
                if input.contains("\"trap\":true") {
                    panic!("hostile: trapping on request after {calls} calls");
                }
                Ok(format!("{{\"calls\":{calls}}}"))
            }
            "trap" => panic!("hostile: trapping on purpose"),
            "error" => Err(StepError {
                code: "hostile".to_owned(),
                message: "failing on purpose".to_owned(),
                retryable: false,
            }),
            "error-retryable" => Err(StepError {
                code: "busy".to_owned(),
                message: "failing on purpose, worth a retry".to_owned(),
                retryable: true,
            }),
            "invalid-json" => Ok("{this is not json".to_owned()),
            // A JSON string of `bytes` bytes, quotes included.
            "big-output" => {
                let bytes = CONFIG.with(|c| c.borrow().get("bytes").and_then(Value::as_u64));
                let len = bytes.unwrap_or(1 << 20).saturating_sub(2) as usize;
                Ok(format!("\"{}\"", "x".repeat(len)))
            }
            // A JSON array of about `bytes` bytes: `[1,1,…]`, the shape whose
            // tree costs a host ten to twenty times its text.
            "big-array" => {
                let bytes = CONFIG.with(|c| c.borrow().get("bytes").and_then(Value::as_u64));
                let n = (bytes.unwrap_or(1 << 20) / 2).max(1) as usize;
                let mut text = String::with_capacity(2 * n + 1);
                text.push('[');
                for i in 0..n {
                    text.push_str(if i == 0 { "1" } else { ",1" });
                }
                text.push(']');
                Ok(text)
            }
            // Arrays nested 10 000 deep: valid JSON no tree can be built of.
            "deep-output" => Ok(format!("{}{}", "[".repeat(10_000), "]".repeat(10_000))),
            // `{"write": N}` leaves a secret made of N in the heap; `{"find":
            // N}` looks through the whole linear memory for it. A fresh
            // instance must never find what an earlier call wrote.
            "secret" => {
                let input: Value = serde_json::from_str(&input).unwrap_or_default();
                let secret = |n: u64| format!("QFLOW-SECRET-{n}-END");
                if let Some(n) = input.get("write").and_then(Value::as_u64) {
                    let kept: &'static mut String = Box::leak(Box::new(secret(n)));
                    std::hint::black_box(kept);
                    return Ok("\"written\"".to_owned());
                }
                let n = input.get("find").and_then(Value::as_u64).unwrap_or_default();
                let needle = secret(n);
                Ok(format!("{{\"found\":{}}}", memory_holds(needle.as_bytes())))
            }
            "loop" => loop {
                std::hint::black_box(());
            },
            "recurse" => Ok(format!("{}", recurse(1))),
            // Writes `bytes` to stdout, stderr and the host log, in lines.
            "log-flood" => {
                let bytes = CONFIG.with(|c| c.borrow().get("bytes").and_then(Value::as_u64));
                let line = "flood ".repeat(20);
                let mut written = 0;
                while written < bytes.unwrap_or(10 << 20) {
                    println!("{line}");
                    eprintln!("{line}");
                    qflow_sdk::log(qflow_sdk::Level::Info, &line);
                    written += 3 * line.len() as u64;
                }
                Ok(input)
            }
            // Reads the file at config `path`: whatever the sandbox allows.
            "read" => {
                let path = CONFIG
                    .with(|c| c.borrow().get("path").and_then(Value::as_str).map(str::to_owned));
                let path = path.unwrap_or_default();
                std::fs::read_to_string(&path)
                    .map(|text| serde_json::to_string(&text).unwrap_or_default())
                    .map_err(|e| StepError {
                        code: "io".to_owned(),
                        message: format!("{path}: {e}"),
                        retryable: false,
                    })
            }
            // Writes config `text` to the file at config `path`.
            "write" => {
                let get = |k: &str| {
                    CONFIG.with(|c| c.borrow().get(k).and_then(Value::as_str).map(str::to_owned))
                };
                let path = get("path").unwrap_or_default();
                std::fs::write(&path, get("text").unwrap_or_default())
                    .map(|()| "true".to_owned())
                    .map_err(|e| StepError {
                        code: "io".to_owned(),
                        message: format!("{path}: {e}"),
                        retryable: false,
                    })
            }
            // Reads the environment variable named by config `name`.
            "env" => {
                let name = CONFIG
                    .with(|c| c.borrow().get("name").and_then(Value::as_str).map(str::to_owned));
                let name = name.unwrap_or_default();
                std::env::var(&name)
                    .map(|value| serde_json::to_string(&value).unwrap_or_default())
                    .map_err(|e| StepError {
                        code: "env".to_owned(),
                        message: format!("{name}: {e}"),
                        retryable: false,
                    })
            }
            // Prints `lines` empty lines and logs `logs` empty messages.
            "empty-lines" => {
                let count = |k: &str| CONFIG.with(|c| c.borrow().get(k).and_then(Value::as_u64));
                for _ in 0..count("lines").unwrap_or(1_000_000) {
                    println!();
                }
                for _ in 0..count("logs").unwrap_or(500_000) {
                    qflow_sdk::log(qflow_sdk::Level::Info, "");
                }
                Ok(input)
            }
            // `count` error-level log lines.
            "log-error-flood" => {
                let count = CONFIG.with(|c| c.borrow().get("count").and_then(Value::as_u64));
                for n in 0..count.unwrap_or(200_000) {
                    qflow_sdk::log(qflow_sdk::Level::Error, &format!("flood {n}"));
                }
                Ok(input)
            }
            // Control characters in every place a plugin controls: the
            // output, a log line, and (in `escape-error`) the error.
            "escape-output" | "escape-error" => {
                let forged =
                    "\u{1b}]0;owned\u{7}\u{1b}[2J\r\n✓ fake-step      0.1 →      0.2 ms  identity";
                qflow_sdk::log(qflow_sdk::Level::Warn, forged);
                if MODE.with(|m| m.borrow().as_str() == "escape-error") {
                    return Err(StepError {
                        code: "forged".to_owned(),
                        message: forged.to_owned(),
                        retryable: false,
                    });
                }
                Ok(serde_json::to_string(forged).unwrap_or_default())
            }
            // Makes a symlink at config `link` (in the first preopened
            // directory) pointing at config `target`.
            "symlink" => {
                let get = |k: &str| {
                    CONFIG.with(|c| c.borrow().get(k).and_then(Value::as_str).map(str::to_owned))
                };
                let (target, link) =
                    (get("target").unwrap_or_default(), get("link").unwrap_or_default());
                let dirs = wasip2::filesystem::preopens::get_directories();
                let Some((dir, _)) = dirs.first() else {
                    return Err(StepError {
                        code: "io".to_owned(),
                        message: "no directory was granted".to_owned(),
                        retryable: false,
                    });
                };
                dir.symlink_at(&target, &link).map(|()| "true".to_owned()).map_err(|e| StepError {
                    code: "io".to_owned(),
                    message: format!("{link} -> {target}: {e:?}"),
                    retryable: false,
                })
            }
            // Holds `mb` MiB until the file at config `path` exists.
            "hold" => {
                let mb = CONFIG.with(|c| c.borrow().get("mb").and_then(Value::as_u64)).unwrap_or(1);
                let path = CONFIG
                    .with(|c| c.borrow().get("path").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_default();
                let held = vec![1u8; (mb << 20) as usize];
                while std::fs::metadata(&path).is_err() {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Ok(format!("{}", std::hint::black_box(&held).len()))
            }
            // Opens the file at config `path` for reading: a FIFO with no
            // writer blocks in the kernel.
            "fifo" => {
                let path = CONFIG
                    .with(|c| c.borrow().get("path").and_then(Value::as_str).map(str::to_owned))
                    .unwrap_or_default();
                std::fs::read(&path).map(|_| "true".to_owned()).map_err(|e| StepError {
                    code: "io".to_owned(),
                    message: format!("{path}: {e}"),
                    retryable: false,
                })
            }
            // Sleeps, an hour at a time, for ever.
            "sleep-forever" => loop {
                std::thread::sleep(std::time::Duration::from_secs(3600));
            },
            "alloc" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            other => Err(StepError {
                code: "bad-config".to_owned(),
                message: format!("unknown mode {other:?}"),
                retryable: false,
            }),
        }
    }
}

qflow_sdk::step_bindings::export_step_world!(Hostile with_types_in qflow_sdk::step_bindings);

/// Whether the bytes of `needle` appear anywhere in this instance's linear
/// memory other than where `needle` itself is.
fn memory_holds(needle: &[u8]) -> bool {
    let size = core::arch::wasm32::memory_size(0) * 65536;
    let own = needle.as_ptr() as usize..needle.as_ptr() as usize + needle.len();
    // SAFETY: on wasm32, every address below the memory's size is memory
    // this instance owns; the first page is skipped, so no address is null.
    let memory = unsafe { core::slice::from_raw_parts(65536 as *const u8, size - 65536) };
    memory.windows(needle.len()).enumerate().any(|(at, window)| {
        let address = at + 65536;
        window == needle && !own.contains(&address)
    })
}

/// Recursion without end: the guest's stack overflows.
#[allow(unconditional_recursion)]
fn recurse(depth: u64) -> u64 {
    std::hint::black_box(recurse(std::hint::black_box(depth + 1))) + 1
}
