//! Python and JavaScript steps, as a new user makes them: `qflow new`,
//! `qflow build` (componentize-py and componentize-js, pinned, installed by
//! the first build), and a flow that runs both beside a Rust step.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use super::{qflow, stderr, stdout_json};
use qflow_tests::plugins_dir;

/// Whether python3 (with venv) and npm are here; CI says they must be
/// (`QFLOW_REQUIRE_LANGS=1`).
fn tools() -> bool {
    let runs = |program: &str, args: &[&str]| {
        Command::new(program).args(args).output().is_ok_and(|o| o.status.success())
    };
    let present = runs("python3", &["-m", "venv", "--help"]) && runs("npm", &["--version"]);
    if !present {
        let required = std::env::var("QFLOW_REQUIRE_LANGS").is_ok_and(|v| v == "1");
        assert!(!required, "python3 -m venv and npm are required here (QFLOW_REQUIRE_LANGS=1)");
        eprintln!("skipping: python3 -m venv or npm is missing");
    }
    present
}

fn patch(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{} has no {from:?}", file.display());
    std::fs::write(file, text.replace(from, to)).unwrap();
}

fn run(flow: &Path, plugins: &Path, input: &str) -> Value {
    let (flow, plugins) = (flow.to_str().unwrap(), plugins.to_str().unwrap());
    let out =
        qflow(&["run", flow, "--plugins", plugins, "--input", input, "--json", "--outputs", "all"]);
    assert!(matches!(out.status.code(), Some(0 | 1)), "{}", stderr(&out));
    stdout_json(&out)
}

fn step<'a>(summary: &'a Value, id: &str) -> &'a Value {
    let steps = summary["steps"].as_array().unwrap();
    steps.iter().find(|s| s["id"] == id).unwrap_or_else(|| panic!("no step {id}: {summary}"))
}

#[test]
fn python_and_javascript_steps_build_from_the_sdks_and_run_beside_a_rust_step() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (root, plugins) = (dir.path(), dir.path().join("plugins"));
    let root_text = root.to_str().unwrap();
    for (name, lang) in [("words-py", "python"), ("words-js", "js")] {
        let out = qflow(&["new", name, "--lang", lang, "--dir", root_text]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(
            root.join(name).join("README.md").is_file()
                && root.join(name).join("flow.toml").is_file()
        );
    }
    // Each learns to fail as code fails (an exception, a thrown Error), and
    // to try what a step cannot do: return a coroutine, or a Promise.
    patch(
        &root.join("words-py/app.py"),
        "    words = text.split()\n",
        "    if text == \"boom\":\n        raise ValueError(\"boom\")\n    if text == \"later\":\n        \
         async def later():\n            return 1\n        return later()\n    words = text.split()\n",
    );
    patch(
        &root.join("words-js/app.js"),
        "    const words =",
        "    if (text === \"boom\") throw new Error(\"boom\");\n    \
         if (text === \"later\") return Promise.resolve(1);\n    const words =",
    );
    for name in ["words-py", "words-js"] {
        let project = root.join(name);
        let out = qflow(&["build", project.to_str().unwrap(), "--out", plugins.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", stderr(&out));
        assert!(plugins.join(format!("{name}.wasm")).is_file());
    }
    std::fs::copy(plugins_dir().join("identity.wasm"), plugins.join("identity.wasm")).unwrap();

    // Both say they are what their files are called, built against 0.2.0.
    let out = qflow(&["plugins", "list", "--json", "--plugins", plugins.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let listed = stdout_json(&out);
    for name in ["words-py", "words-js"] {
        let info = listed.as_array().unwrap().iter().find(|p| p["name"] == name).unwrap();
        assert_eq!(info["contract"], "0.2.0", "{info}");
        assert!(info.get("warnings").is_none(), "{info}");
    }

    // The same component under another file name: it works under that
    // name, with a warning that it says it is `words-py`. And one whose
    // contract import is damaged is refused from its imports, before any
    // compile, naming the import.
    let other = root.join("others");
    std::fs::create_dir(&other).unwrap();
    let python = std::fs::read(plugins.join("words-py.wasm")).unwrap();
    std::fs::write(other.join("renamed.wasm"), &python).unwrap();
    let (from, to) = (b"qflow:plugin/host@0.2.0", b"qflow:plugin/hosX@0.2.0");
    let mut damaged = python.clone();
    let at = damaged.windows(from.len()).position(|w| w == from).expect("a host import");
    damaged[at..at + to.len()].copy_from_slice(to);
    std::fs::write(other.join("damaged.wasm"), damaged).unwrap();
    let out = qflow(&["plugins", "list", "--json", "--plugins", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let listed = stdout_json(&out);
    let entry =
        |name: &str| listed.as_array().unwrap().iter().find(|p| p["name"] == name).unwrap().clone();
    let warnings = entry("renamed")["warnings"].to_string();
    assert!(
        warnings.contains("says it is `words-py`") && warnings.contains("`renamed`"),
        "{warnings}"
    );
    let error = entry("damaged")["error"].to_string();
    assert!(error.contains("does not provide: `qflow:plugin/hosX@0.2.0`"), "{error}");

    let flow = root.join("mixed.toml");
    std::fs::write(
        &flow,
        "[flow]\nname = \"mixed\"\n\
         [[step]]\nid = \"py\"\nplugin = \"words-py\"\nconfig = { top = 2 }\n\
         [[step]]\nid = \"js\"\nplugin = \"words-js\"\nneeds = [\"py\"]\ninput = \"${input}\"\n\
         [[step]]\nid = \"rust\"\nplugin = \"identity\"\nneeds = [\"py\", \"js\"]\n",
    )
    .unwrap();
    let summary = run(&flow, &plugins, "\"to be or not to be\"");
    assert_eq!(summary["status"], "succeeded", "{summary}");
    let py = json!({"words": 6, "top": [["to", 2], ["be", 2]]});
    let js = json!({"words": 6, "top": [["be", 2], ["to", 2], ["not", 1]]});
    assert_eq!(step(&summary, "py")["output"], py);
    assert_eq!(step(&summary, "js")["output"], js);
    assert_eq!(step(&summary, "rust")["output"], json!({"py": py, "js": js}));
    // Their logs went through host.log.
    assert_eq!(step(&summary, "py")["log"], json!(["info: counting 6 words"]), "{summary}");

    // An exception is a step error with its message.
    let summary = run(&flow, &plugins, "\"boom\"");
    let error = &step(&summary, "py")["error"];
    assert_eq!(error["kind"], "step-error", "{summary}");
    assert!(error["message"].as_str().unwrap().contains("ValueError: boom"), "{error}");
    // A StepError keeps its code.
    let summary = run(&flow, &plugins, "5");
    let error = &step(&summary, "py")["error"];
    assert_eq!(error["code"], "bad-input", "{error}");
    assert!(error["message"].as_str().unwrap().contains("the input must be text"), "{error}");
    // A thrown Error, in JavaScript, likewise (its message kept, not lost).
    let alone = root.join("js.toml");
    std::fs::write(&alone, "[flow]\nname = \"js\"\n[[step]]\nid = \"js\"\nplugin = \"words-js\"\n")
        .unwrap();
    let summary = run(&alone, &plugins, "\"boom\"");
    let error = &step(&summary, "js")["error"];
    assert_eq!(error["kind"], "step-error", "{summary}");
    assert!(error["message"].as_str().unwrap().contains("Error: boom"), "{error}");
    let summary = run(&alone, &plugins, "[1]");
    assert_eq!(step(&summary, "js")["error"]["code"], "bad-input", "{summary}");

    // Neither output is taken for done while it is still to come: an
    // async step is refused, by name, rather than output `{}`.
    let summary = run(&alone, &plugins, "\"later\"");
    let error = &step(&summary, "js")["error"];
    assert_eq!(error["code"], "async-unsupported", "{summary}");
    assert!(error["message"].as_str().unwrap().contains("run returned a Promise"), "{error}");
    let summary = run(&flow, &plugins, "\"later\"");
    let error = &step(&summary, "py")["error"];
    assert_eq!(error["code"], "async-unsupported", "{summary}");
    assert!(error["message"].as_str().unwrap().contains("run returned a coroutine"), "{error}");
}
