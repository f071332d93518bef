//! The component store: the disk cache across hosts, corruption, single
//! flight, the memory limit, dependencies, preloading, shared assets.

use std::path::Path;

use qflow::{Host, RunStatus};
use serde_json::json;

use crate::support::{config, hostile_host, plugins_dir, run};

const TWO_PLUGINS: &str = r#"
    [flow]
    name = "two"
    [[step]]
    id = "q"
    plugin = "jq"
    config = { filter = ".n * 2" }
    [[step]]
    id = "h"
    plugin = "hash"
    needs = ["q"]
"#;

fn host_on(cache: &Path) -> Host {
    Host::new(config(plugins_dir(), Some(cache))).unwrap()
}

/// An empty cache directory, and a plugins directory of its own holding
/// copies of `jq` and `hash` (files a test may rewrite).
fn cache_and_copied_plugins() -> (tempfile::TempDir, tempfile::TempDir) {
    let (cache, plugins) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for name in ["jq", "hash"] {
        let file = format!("{name}.wasm");
        std::fs::copy(plugins_dir().join(&file), plugins.path().join(&file)).unwrap();
    }
    (cache, plugins)
}

fn artifacts(cache: &Path) -> Vec<std::path::PathBuf> {
    let dir = cache.join("components");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
        .collect();
    files.sort();
    files
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_host_on_the_same_cache_compiles_nothing() {
    let cache = tempfile::tempdir().unwrap();
    let first = host_on(cache.path());
    let before = run(&first, TWO_PLUGINS, json!({"n": 21})).await;
    assert_eq!(before.status, RunStatus::Succeeded);
    assert_eq!(before.store.components.compiles, 2);
    assert_eq!(before.store.components.disk_hits, 0);
    assert_eq!(artifacts(cache.path()).len(), 2);
    drop(first);

    let second = host_on(cache.path());
    let after = run(&second, TWO_PLUGINS, json!({"n": 21})).await;
    assert_eq!(after.output("h"), before.output("h"));
    assert_eq!(after.store.components.compiles, 0, "{:?}", after.store);
    assert_eq!(after.store.components.disk_hits, 2);
}

/// A new host reads neither an unchanged component (its digest is kept by
/// the file's stamp) nor a verified artifact whole; a changed file is
/// hashed again.
#[tokio::test(flavor = "multi_thread")]
async fn an_unchanged_component_is_not_hashed_again_by_a_new_host() {
    let (cache, plugins) = cache_and_copied_plugins();
    let host = || Host::new(config(plugins.path(), Some(cache.path()))).unwrap();
    let first = run(&host(), TWO_PLUGINS, json!({"n": 1})).await.store.components;
    assert_eq!((first.files_hashed, first.compiles), (2, 2), "{first:?}");
    let second = run(&host(), TWO_PLUGINS, json!({"n": 1})).await.store.components;
    assert_eq!((second.files_hashed, second.disk_hits, second.compiles), (0, 2, 0), "{second:?}");
    // The same bytes written again: a new stamp, so hashed again (and found
    // to be the same component, already compiled).
    let jq = plugins.path().join("jq.wasm");
    std::fs::write(&jq, std::fs::read(&jq).unwrap()).unwrap();
    let third = run(&host(), TWO_PLUGINS, json!({"n": 1})).await.store.components;
    assert_eq!((third.files_hashed, third.disk_hits, third.compiles), (1, 2, 0), "{third:?}");
}

/// A digest that does not match the file it is kept for (taken from bytes
/// half-rewritten within one tick of the file's clock) fails that load as
/// a change under way, and is then forgotten: the next load reads the file
/// afresh, rather than failing the same way for ever.
#[tokio::test(flavor = "multi_thread")]
async fn a_digest_found_wrong_for_its_file_is_forgotten() {
    let (cache, plugins) = cache_and_copied_plugins();
    let host = || Host::new(config(plugins.path(), Some(cache.path()))).unwrap();
    assert_eq!(run(&host(), TWO_PLUGINS, json!({"n": 1})).await.status, RunStatus::Succeeded);
    // The index says jq.wasm, with its present stamp, is other bytes.
    let index = cache.path().join("digests.json");
    let mut digests: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
    let (_, entry) = digests
        .as_object_mut()
        .unwrap()
        .iter_mut()
        .find(|(path, _)| path.ends_with("jq.wasm"))
        .expect("jq.wasm's digest is kept");
    entry[1] = json!("ab".repeat(32));
    std::fs::write(&index, serde_json::to_vec(&digests).unwrap()).unwrap();

    let host = host();
    let failed = run(&host, TWO_PLUGINS, json!({"n": 1})).await;
    assert_eq!(failed.status, RunStatus::Failed);
    let message = &failed.step("q").unwrap().error.as_ref().unwrap().message;
    assert!(message.contains("jq.wasm changed while it was being loaded"), "{message}");
    let again = run(&host, TWO_PLUGINS, json!({"n": 1})).await;
    assert_eq!(again.status, RunStatus::Succeeded, "{:?}", again.steps[0].error);
    assert_eq!(again.output("q"), Some(json!(2)));
    let index = std::fs::read_to_string(cache.path().join("digests.json")).unwrap();
    assert!(!index.contains(&"ab".repeat(32)), "the wrong digest is gone from the index");
}

/// A compile over the load timeout is reported as the timeout it is (not
/// as an invalid component), and goes on to fill the disk cache.
#[tokio::test(flavor = "multi_thread")]
async fn a_compile_over_the_load_timeout_is_a_timeout_and_still_fills_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let mut impatient = config(plugins_dir(), Some(cache.path()));
    impatient.cache.load_timeout = std::time::Duration::from_millis(1);
    impatient.cache.compile_concurrency = 1;
    let host = Host::new(impatient).unwrap();
    let error = host.catalog().describe("jq").await.unwrap_err();
    assert!(matches!(error, qflow::PluginError::Timeout { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains("compiling") && message.contains("load timeout of 1 ms"), "{message}");
    assert!(!message.contains("not a valid"), "{message}");
    // The compile went on: its artifact lands in the cache, and the next
    // host loads it from there.
    let mut polls = 0;
    while artifacts(cache.path()).is_empty() {
        polls += 1;
        assert!(polls < 1200, "the compile never finished");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let info = host_on(cache.path()).catalog().describe("jq").await.unwrap();
    assert_eq!(info.loaded_from, "disk");
}

#[tokio::test(flavor = "multi_thread")]
async fn corrupt_and_truncated_artifacts_are_recompiled_and_replaced() {
    let cache = tempfile::tempdir().unwrap();
    run(&host_on(cache.path()), TWO_PLUGINS, json!({"n": 1})).await;
    let files = artifacts(cache.path());
    // Flip one byte in the middle of the first, cut the second short.
    let mut bytes = std::fs::read(&files[0]).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&files[0], bytes).unwrap();
    let bytes = std::fs::read(&files[1]).unwrap();
    std::fs::write(&files[1], &bytes[..bytes.len() / 3]).unwrap();

    let summary = run(&host_on(cache.path()), TWO_PLUGINS, json!({"n": 1})).await;
    assert_eq!(summary.status, RunStatus::Succeeded);
    let stats = summary.store.components;
    assert_eq!((stats.compiles, stats.disk_rejects, stats.disk_hits), (2, 2, 0), "{stats:?}");

    // The replacements are sound: the next host loads both from disk.
    let summary = run(&host_on(cache.path()), TWO_PLUGINS, json!({"n": 1})).await;
    let stats = summary.store.components;
    assert_eq!((stats.compiles, stats.disk_hits), (0, 2), "{stats:?}");
}

/// An artifact carries the digest of the component it was compiled from:
/// one plugin's artifact copied over another's name is a miss, replaced,
/// and never runs in the other's place.
#[tokio::test(flavor = "multi_thread")]
async fn another_plugins_artifact_under_this_name_is_never_run() {
    let cache = tempfile::tempdir().unwrap();
    let summary = run(&host_on(cache.path()), TWO_PLUGINS, json!({"n": 1})).await;
    let expected = summary.output("h").unwrap();
    let files = artifacts(cache.path());
    assert_eq!(files.len(), 2);
    // Both artifacts are now the same plugin's, whichever it is.
    std::fs::copy(&files[0], &files[1]).unwrap();

    let summary = run(&host_on(cache.path()), TWO_PLUGINS, json!({"n": 1})).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{summary:#?}");
    assert_eq!(summary.output("h").unwrap(), expected, "each plugin ran its own code");
    let stats = summary.store.components;
    assert_eq!((stats.disk_hits, stats.disk_rejects, stats.compiles), (1, 1, 1), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unusable_cache_directory_means_memory_only() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"in the way").unwrap();
    let host = host_on(&not_a_dir);
    let summary = run(&host, TWO_PLUGINS, json!({"n": 2})).await;
    assert_eq!(summary.status, RunStatus::Succeeded);
    assert_eq!(summary.store.components.compiles, 2);
    let again = run(&host, TWO_PLUGINS, json!({"n": 2})).await;
    assert_eq!(again.store.components.compiles, 2, "memory still serves");
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_first_uses_compile_once() {
    let host = std::sync::Arc::new(Host::new(config(plugins_dir(), None)).unwrap());
    let toml = "[flow]\nname = \"one\"\n[[step]]\nid = \"q\"\nplugin = \"jq\"\nconfig = { filter = \".\" }\n";
    let runs = (0..50).map(|i| {
        let host = host.clone();
        tokio::spawn(async move { run(&host, toml, json!(i)).await })
    });
    for (i, summary) in futures::future::join_all(runs).await.into_iter().enumerate() {
        assert_eq!(summary.unwrap().output("q"), Some(json!(i)));
    }
    assert_eq!(host.stats().components.compiles, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_memory_cache_keeps_to_its_byte_limit() {
    let mut settings = config(plugins_dir(), None);
    settings.cache.memory_limit = 1 << 20; // about two of these plugins
    let host = Host::new(settings).unwrap();
    for plugin in ["identity", "hash", "fib", "sleep", "csv", "identity"] {
        let toml = format!("[flow]\nname = \"one\"\n[[step]]\nid = \"s\"\nplugin = \"{plugin}\"\n");
        let input = if plugin == "csv" { json!("a\n1\n") } else { json!({"n": 3, "ms": 0}) };
        let summary = run(&host, &toml, input).await;
        assert_eq!(summary.status, RunStatus::Succeeded, "{summary:#?}");
        let memory = summary.store.components.memory;
        assert!(memory.bytes <= memory.limit_bytes, "{memory:?}");
    }
    let stats = host.stats().components;
    assert!(stats.memory.evictions > 0, "{stats:?}");
    assert!(stats.memory.entries < 5, "{stats:?}");
    // identity was evicted by the time it came back: compiled twice.
    assert_eq!(stats.compiles, 6, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dependency_cycle_is_reported_with_its_members() {
    let host = hostile_host();
    let toml = "[flow]\nname = \"c\"\n[[step]]\nid = \"a\"\nplugin = \"needs-cycle-a\"\n";
    let summary = run(&host, toml, json!(null)).await;
    let message = &summary.step("a").unwrap().error.as_ref().unwrap().message;
    assert!(
        message.contains(
            "plugins need each other in a cycle: needs-cycle-a -> needs-cycle-b -> needs-cycle-a"
        ),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_missing_dependency_is_named() {
    let host = hostile_host();
    let toml = "[flow]\nname = \"m\"\n[[step]]\nid = \"a\"\nplugin = \"needs-missing\"\n";
    let summary = run(&host, toml, json!(null)).await;
    let message = &summary.step("a").unwrap().error.as_ref().unwrap().message;
    assert!(
        message.contains(
            "plugin `needs-missing` needs `no-such-plugin`: no plugin `no-such-plugin` in"
        ),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hot_plugins_and_assets_are_preloaded_by_the_next_host() {
    let cache = tempfile::tempdir().unwrap();
    let toml = r#"
        [flow]
        name = "hot"
        [[loader]]
        id = "data"
        plugin = "file-loader"
        dirs = { "/data" = "examples/data" }
        [[step]]
        id = "rows"
        plugin = "csv"
        config = { asset = "data/orders.csv" }
        [[step]]
        id = "cold"
        plugin = "identity"
    "#;
    let first = host_on(cache.path());
    for _ in 0..3 {
        run(&first, toml, json!(null)).await;
    }
    drop(first);
    // identity was used 3 times too: make it cold again by a fresh count.
    let second = host_on(cache.path());
    assert!(second.preload().await >= 3, "csv, file-loader and the asset");
    let stats = second.stats();
    assert_eq!(stats.components.compiles, 0, "{stats:?}");
    assert!(stats.components.memory.entries >= 2, "{stats:?}");
    assert_eq!(stats.assets.entries, 1, "{stats:?}");

    let summary = run(&second, toml, json!(null)).await;
    assert_eq!(summary.output("rows").unwrap().as_array().unwrap().len(), 8);
    assert_eq!(summary.store.assets.misses, 1, "only the preload missed");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_asset_is_loaded_once_and_shared_by_every_step_and_run() {
    let host = Host::new(config(plugins_dir(), None)).unwrap();
    let toml = r#"
        [flow]
        name = "shared"
        [[loader]]
        id = "data"
        plugin = "file-loader"
        dirs = { "/data" = "examples/data" }
        [[step]]
        id = "a"
        plugin = "csv"
        config = { asset = "data/orders.csv" }
        [[step]]
        id = "b"
        plugin = "csv"
        config = { asset = "data/orders.csv", infer_types = true }
    "#;
    run(&host, toml, json!(null)).await;
    let summary = run(&host, toml, json!(null)).await;
    assert_eq!(summary.output("a").unwrap()[0]["amount"], "1250.00");
    assert_eq!(summary.output("b").unwrap()[0]["amount"], 1250.0);
    let assets = summary.store.assets;
    assert_eq!(assets.entries, 1);
    // Loaded once: one request started the load (a miss: the loader ran
    // once); every other read, however the warm spares timed it, was served
    // from memory or joined that load. Four inits at least read it (two
    // steps, two runs; warm spares may read it too).
    assert_eq!(assets.misses, 1, "{assets:?}");
    assert!(assets.hits + assets.joins >= 3, "{assets:?}");
    let size =
        std::fs::metadata(crate::support::repo().join("examples/data/orders.csv")).unwrap().len();
    assert_eq!(assets.bytes, size);
}

#[tokio::test(flavor = "multi_thread")]
async fn evicting_a_component_does_not_disturb_a_step_using_it() {
    let mut settings = config(plugins_dir(), None);
    settings.cache.memory_limit = 1 << 20; // about two of these plugins
    let host = std::sync::Arc::new(Host::new(settings).unwrap());
    let mut events = host.subscribe();
    let sleeper = {
        let host = host.clone();
        let toml = "[flow]\nname = \"s\"\n[[step]]\nid = \"s\"\nplugin = \"sleep\"\nconfig = { ms = 600 }\n";
        tokio::spawn(async move { run(&host, toml, json!({"kept": true})).await })
    };
    crate::support::started(&mut events, &["s"]).await;
    for plugin in ["identity", "hash", "fib"] {
        let toml = format!("[flow]\nname = \"o\"\n[[step]]\nid = \"o\"\nplugin = \"{plugin}\"\n");
        run(&host, &toml, json!({"n": 1})).await;
    }
    assert!(host.stats().components.memory.evictions >= 2);
    let summary = sleeper.await.unwrap();
    assert_eq!(summary.status, RunStatus::Succeeded, "{summary:#?}");
    assert_eq!(summary.output("s"), Some(json!({"kept": true})));
}
