//! The contract's versions: a component built against `qflow:plugin@0.1.0`
//! (kept as a fixture, built before 0.2.0 existed) loads and runs unchanged
//! beside 0.2.0 ones; one built against a version this host does not know
//! is refused, naming the version.

use std::path::Path;

use qflow::{Host, PluginError, RunStatus};
use serde_json::json;

use crate::support::{config, flow, plugins_dir, repo};

/// The `csv` step as built against 0.1.0 (it reads its input through
/// `host.asset`, an import of 0.1.0's `host`).
const FIXTURE: &str = "host/tests/fixtures/v0.1.0/csv.wasm";

/// A plugins directory with the 0.1.0 fixture as `csv01` beside today's
/// `file-loader`, `csv` and `identity`.
fn plugins_with(fixture: &[u8]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("csv01.wasm"), fixture).unwrap();
    for name in ["file-loader", "csv", "identity"] {
        let file = format!("{name}.wasm");
        std::fs::copy(plugins_dir().join(&file), dir.path().join(&file)).unwrap();
    }
    dir
}

fn orders(plugin: &str) -> String {
    format!(
        r#"[flow]
name = "contract"
[[loader]]
id = "data"
plugin = "file-loader"
dirs = {{ "/data" = "examples/data" }}
[[step]]
id = "orders"
plugin = "{plugin}"
config = {{ asset = "data/orders.csv", infer_types = true }}
[[step]]
id = "same"
plugin = "identity"
needs = ["orders"]
"#
    )
}

fn host(dir: &Path) -> Host {
    Host::new(config(dir, None)).expect("the host starts")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_built_for_0_1_0_runs_unchanged_beside_0_2_0_ones() {
    let fixture = std::fs::read(repo().join(FIXTURE)).unwrap();
    let dir = plugins_with(&fixture);
    let host = host(dir.path());
    let old = host.run(&flow(&orders("csv01")), json!(null)).await.unwrap();
    assert_eq!(old.status, RunStatus::Succeeded, "{:?}", old.steps);
    let new = host.run(&flow(&orders("csv")), json!(null)).await.unwrap();
    assert_eq!(new.status, RunStatus::Succeeded, "{:?}", new.steps);
    let rows = old.output("same").unwrap();
    assert_eq!(rows, new.output("same").unwrap());
    assert_eq!(rows[0]["customer"], "Acme Corp", "{rows}");
    // Each plugin says which contract it was built against.
    for (name, version) in [("csv01", "0.1.0"), ("csv", "0.2.0"), ("file-loader", "0.2.0")] {
        let info = host.catalog().describe(name).await.unwrap();
        assert_eq!(info.contract.as_deref(), Some(version), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_component_built_for_an_unknown_contract_is_refused_naming_it() {
    // The fixture, its imports renamed to a 0.9.0 no host has (same length:
    // the binary stays well-formed).
    let mut bytes = std::fs::read(repo().join(FIXTURE)).unwrap();
    for interface in ["host", "types"] {
        let from = format!("qflow:plugin/{interface}@0.1.0");
        let to = format!("qflow:plugin/{interface}@0.9.0");
        let mut at = 0;
        while let Some(i) = find(&bytes[at..], from.as_bytes()) {
            bytes[at + i..at + i + to.len()].copy_from_slice(to.as_bytes());
            at += i + to.len();
        }
    }
    let dir = plugins_with(&bytes);
    let host = host(dir.path());
    let error = host.catalog().describe("csv01").await.unwrap_err();
    assert!(matches!(error, PluginError::NoWorld { .. }), "{error:?}");
    let message = qflow::model::error_chain(&error);
    assert!(message.contains("csv01.wasm"), "{message}");
    assert!(
        message.contains("imports what Qflow does not provide: `qflow:plugin/types@0.9.0`, `qflow:plugin/host@0.9.0`"),
        "{message}"
    );
    assert!(message.contains("Qflow provides qflow:plugin@0.1.0, @0.2.0"), "{message}");
    // Found from its imports, before any compile.
    assert_eq!(host.stats().components.compiles, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plugin_that_names_itself_otherwise_than_its_file_is_warned_about() {
    let fixture = std::fs::read(repo().join(FIXTURE)).unwrap();
    let dir = plugins_with(&fixture);
    let host = host(dir.path());
    // `csv01.wasm` says it is `csv`: it works, under its file's name, with a warning.
    let info = host.catalog().describe("csv01").await.unwrap();
    assert_eq!(info.name, "csv01");
    assert_eq!(info.warnings.len(), 1, "{:?}", info.warnings);
    assert!(info.warnings[0].contains("says it is `csv`") && info.warnings[0].contains("`csv01`"));
    assert!(host.catalog().describe("csv").await.unwrap().warnings.is_empty());
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
