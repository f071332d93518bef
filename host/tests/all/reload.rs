//! Hot reload of the plugins directory, with a real watcher on real files.

use std::path::Path;
use std::time::Duration;

use qflow::{Event, EventData, Host, Problem, RunStatus};
use serde_json::json;
use tokio::sync::broadcast::Receiver;

use crate::support::{config, flow, plugins_dir, run, started};

/// A plugins directory with `sleep` and a plugin `swap` that starts out as
/// `identity` and becomes `hash` when replaced.
fn plugins() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["sleep", "identity", "fib"] {
        std::fs::copy(
            plugins_dir().join(format!("{name}.wasm")),
            dir.path().join(format!("{name}.wasm")),
        )
        .unwrap();
    }
    std::fs::copy(plugins_dir().join("identity.wasm"), dir.path().join("swap.wasm")).unwrap();
    dir
}

/// Replaces a file the way a build tool does: write aside, then rename.
fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn hash_bytes() -> Vec<u8> {
    std::fs::read(plugins_dir().join("hash.wasm")).unwrap()
}

const SWAP: &str = "[flow]\nname = \"swap\"\n[[step]]\nid = \"s\"\nplugin = \"swap\"\n";

/// The next plugin event (added, reloaded, failed, removed), waiting up to 10 s.
async fn plugin_event(events: &mut Receiver<Event>) -> EventData {
    let next = async {
        loop {
            match events.recv().await.map(|event| event.data) {
                Ok(
                    event @ (EventData::PluginAdded { .. }
                    | EventData::PluginReloaded { .. }
                    | EventData::PluginReloadFailed { .. }
                    | EventData::PluginRemoved { .. }),
                ) => return event,
                Ok(_) => continue,
                Err(e) => panic!("events: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), next).await.expect("a plugin event within 10 s")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replaced_plugin_serves_the_next_run_while_the_run_in_flight_keeps_the_old() {
    let dir = plugins();
    let host = std::sync::Arc::new(Host::new(config(dir.path(), None)).unwrap());
    let _watch = host.watch().unwrap();
    let mut events = host.subscribe();
    assert_eq!(run(&host, SWAP, json!("abc")).await.output("s"), Some(json!("abc")));

    let mut steps = host.subscribe();
    let in_flight = {
        let host = host.clone();
        let toml = "[flow]\nname = \"slow\"\n[[step]]\nid = \"nap\"\nplugin = \"sleep\"\n\
                    config = { ms = 5000 }\n[[step]]\nid = \"s\"\nplugin = \"swap\"\nneeds = [\"nap\"]\n";
        tokio::spawn(async move { run(&host, toml, json!("abc")).await })
    };
    started(&mut steps, &["nap"]).await;
    replace(&dir.path().join("swap.wasm"), &hash_bytes());
    match plugin_event(&mut events).await {
        EventData::PluginReloaded { plugin, version } => {
            assert_eq!((&*plugin, version.as_str()), ("swap", "0.1.0"))
        }
        other => panic!("{other:?}"),
    }
    // The swap happened before the run in flight reached its `s` step: on
    // the channel (one order for all events), the reload comes first.
    loop {
        match steps.try_recv().map(|e| e.data) {
            Ok(EventData::PluginReloaded { .. }) => break,
            Ok(EventData::StepStarted { step, .. }) if &*step == "s" => {
                panic!("the run in flight reached `s` before the reload: make `nap` longer")
            }
            Ok(_) => continue,
            Err(e) => panic!("the reload event is missing: {e}"),
        }
    }

    let next = run(&host, SWAP, json!("abc")).await;
    assert_eq!(next.output("s").unwrap()["bytes"], 3, "the new version (hash) serves");
    let old = in_flight.await.unwrap();
    assert_eq!(old.status, RunStatus::Succeeded);
    assert_eq!(old.output("s"), Some(json!("abc")), "the run in flight finished on identity");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_replacement_leaves_the_old_version_serving() {
    let dir = plugins();
    let host = Host::new(config(dir.path(), None)).unwrap();
    let _watch = host.watch().unwrap();
    let mut events = host.subscribe();
    assert_eq!(run(&host, SWAP, json!(1)).await.output("s"), Some(json!(1)));

    replace(&dir.path().join("swap.wasm"), b"\0asm garbage, not a component");
    match plugin_event(&mut events).await {
        EventData::PluginReloadFailed { plugin, error } => {
            assert_eq!(&*plugin, "swap");
            assert!(error.contains("swap.wasm is not a valid WebAssembly component"), "{error}");
        }
        other => panic!("{other:?}"),
    }
    let summary = run(&host, SWAP, json!(2)).await;
    assert_eq!(summary.output("s"), Some(json!(2)), "{summary:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_removed_plugin_fails_new_runs_with_a_clear_error() {
    let dir = plugins();
    let host = Host::new(config(dir.path(), None)).unwrap();
    let _watch = host.watch().unwrap();
    let mut events = host.subscribe();
    run(&host, SWAP, json!(1)).await;
    std::fs::remove_file(dir.path().join("swap.wasm")).unwrap();
    assert!(
        matches!(plugin_event(&mut events).await, EventData::PluginRemoved { plugin } if &*plugin == "swap")
    );
    let err = host.run(&flow(SWAP), json!(1)).await.unwrap_err();
    assert!(
        matches!(&err.problems[..], [Problem::UnknownPlugin { plugin, .. }] if plugin == "swap"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_plugin_becomes_available() {
    let dir = plugins();
    let host = Host::new(config(dir.path(), None)).unwrap();
    let _watch = host.watch().unwrap();
    let mut events = host.subscribe();
    replace(&dir.path().join("digest.wasm"), &hash_bytes());
    assert!(
        matches!(plugin_event(&mut events).await, EventData::PluginAdded { plugin, .. } if &*plugin == "digest")
    );
    let toml = "[flow]\nname = \"d\"\n[[step]]\nid = \"s\"\nplugin = \"digest\"\n";
    assert_eq!(run(&host, toml, json!("abc")).await.output("s").unwrap()["bytes"], 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_of_writes_is_one_reload() {
    let dir = plugins();
    let host = Host::new(config(dir.path(), None)).unwrap();
    let _watch = host.watch().unwrap();
    let mut events = host.subscribe();
    run(&host, SWAP, json!(1)).await;
    // Five writes in quick succession, in place, the way a slow copy looks.
    let path = dir.path().join("swap.wasm");
    let hash = hash_bytes();
    for part in 1..=5 {
        std::fs::write(&path, &hash[..hash.len() * part / 5]).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(matches!(plugin_event(&mut events).await, EventData::PluginReloaded { .. }));
    // Nothing else comes: no reload of a partial file, no second reload. A
    // file written after the burst is reported after anything the burst
    // could still cause, so the next plugin event must be about it.
    replace(&dir.path().join("marker.wasm"), &hash_bytes());
    match plugin_event(&mut events).await {
        EventData::PluginAdded { plugin, .. } => assert_eq!(&*plugin, "marker"),
        other => panic!("a second event from the burst: {other:?}"),
    }
    assert_eq!(run(&host, SWAP, json!("abc")).await.output("s").unwrap()["bytes"], 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_embedder_can_reload_by_hand() {
    let dir = plugins();
    let host = Host::new(config(dir.path(), None)).unwrap();
    let mut events = host.subscribe();
    run(&host, SWAP, json!(1)).await;
    replace(&dir.path().join("swap.wasm"), &hash_bytes());
    host.reload("swap").await.unwrap();
    assert!(matches!(plugin_event(&mut events).await, EventData::PluginReloaded { .. }));
    std::fs::write(dir.path().join("swap.wasm"), b"broken").unwrap();
    let err = host.reload("swap").await.unwrap_err();
    assert!(err.to_string().contains("swap.wasm"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn once_the_watch_ends_files_are_checked_on_use_again() {
    let dir = plugins();
    let host = Host::new(config(dir.path(), None)).unwrap();
    drop(host.watch().unwrap());
    run(&host, SWAP, json!(1)).await;
    replace(&dir.path().join("swap.wasm"), &hash_bytes());
    assert_eq!(run(&host, SWAP, json!("abc")).await.output("s").unwrap()["bytes"], 3);
}

/// A plugin's settings file is read with the plugin: a changed
/// `NAME.plugin.toml` is picked up (through the watcher) by the next steps,
/// which get a pool with the new settings.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_settings_file_reaches_the_next_runs_pools() {
    let dir = plugins();
    let settings = dir.path().join("swap.plugin.toml");
    std::fs::write(&settings, "[pool]\nreuse = 2\n").unwrap();
    let host = Host::new(config(dir.path(), None)).unwrap();
    let _watch = host.watch().unwrap();
    let reuses = |host: &Host| -> Vec<u32> {
        host.history(Vec::new())
            .pools
            .iter()
            .filter(|p| p.plugin == "swap")
            .map(|p| p.reuse)
            .collect()
    };
    run(&host, SWAP, json!(1)).await;
    assert_eq!(reuses(&host), vec![2]);
    replace(&settings, b"[pool]\nreuse = 7\n");
    // The watcher's debounce decides when: run until the new pool appears.
    let picked_up = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            run(&host, SWAP, json!(1)).await;
            if reuses(&host).contains(&7) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    assert!(picked_up.is_ok(), "pools: {:?}", reuses(&host));
}
