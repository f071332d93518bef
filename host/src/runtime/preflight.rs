//! What a component imports and exports, read from its bytes before
//! anything is compiled. A component that needs what Qflow does not
//! provide, or exports neither world's functions, is refused in a
//! millisecond, naming every such import beside what Qflow provides,
//! rather than after seconds of Cranelift. (What passes here may still
//! fail to link, a function or type differing inside a provided interface:
//! that is found after the compile, as before.)

use super::bindings::CONTRACTS;

/// The WASI packages the host links (wasmtime-wasi's p2 and
/// wasmtime-wasi-http's outgoing handler), at any 0.2 version: wasmtime
/// matches a component's 0.2.x to its own.
const WASI: &[&str] =
    &["wasi:cli", "wasi:clocks", "wasi:filesystem", "wasi:io", "wasi:random", "wasi:sockets"];

/// `wasi:http`'s interfaces the host links (the incoming handler is for
/// servers, not steps).
const WASI_HTTP: &[&str] = &["wasi:http/types", "wasi:http/outgoing-handler"];

/// The contract's interfaces, in every version.
const CONTRACT: &[&str] = &["types", "host", "sql"];

/// Whether the host provides the interface an import names
/// (`wasi:cli/environment@0.2.6`, `qflow:plugin/host@0.1.0`).
fn provided(name: &str) -> bool {
    let (interface, version) = name.split_once('@').unwrap_or((name, ""));
    let Some((package, _)) = interface.split_once('/') else { return false };
    let wasi_02 = version.starts_with("0.2.");
    if let Some(rest) = interface.strip_prefix("qflow:plugin/") {
        // `sql` is only in 0.2.0 and later.
        let known = CONTRACTS.contains(&version) && CONTRACT.contains(&rest);
        return known && !(rest == "sql" && version == "0.1.0");
    }
    wasi_02 && (WASI.contains(&package) || WASI_HTTP.contains(&interface))
}

/// What Qflow provides, for a message.
pub(crate) fn offered() -> String {
    format!(
        "qflow:plugin@{} (types, host; sql from 0.2.0), {} and wasi:http/outgoing-handler at 0.2.x",
        CONTRACTS.join(", @"),
        WASI.join(", ")
    )
}

/// What is wrong with the component in `bytes` before it is compiled: the
/// imports the host does not provide, and the exports neither world has
/// (none: it may link). Bytes that do not parse are left for the compiler
/// to describe.
pub(crate) fn problems(bytes: &[u8]) -> Vec<String> {
    if wasmparser::Parser::is_core_wasm(bytes) {
        return vec![
            "it is a core WebAssembly module, not a component: build it for `wasm32-wasip2` \
             (as `qflow build` does), or make it one with `wasm-tools component new`"
                .to_owned(),
        ];
    }
    let (imports, exports) = match surface(bytes) {
        Some(surface) => surface,
        None => return Vec::new(),
    };
    let mut problems = Vec::new();
    let missing: Vec<String> =
        imports.iter().filter(|name| !provided(name)).map(|name| format!("`{name}`")).collect();
    if !missing.is_empty() {
        problems.push(format!(
            "it imports what Qflow does not provide: {} (Qflow provides {})",
            missing.join(", "),
            offered()
        ));
    }
    let has = |names: &[&str]| names.iter().all(|n| exports.iter().any(|e| e == n));
    if !has(&["describe", "init", "run"]) && !has(&["describe", "load"]) {
        let found = if exports.is_empty() { "nothing".to_owned() } else { exports.join(", ") };
        problems.push(format!(
            "it exports {found}, but a step exports `describe`, `init` and `run`, a loader `describe` and `load`"
        ));
    }
    problems
}

/// The component's own imports (interfaces and functions, not types) and
/// exports, by name; `None` if the bytes do not parse.
fn surface(bytes: &[u8]) -> Option<(Vec<String>, Vec<String>)> {
    let (mut imports, mut exports) = (Vec::new(), Vec::new());
    // Nested modules and components have imports of their own, satisfied
    // inside the component: only the outermost ones are the host's to give.
    let mut depth = 0usize;
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let payload = payload.ok()?;
        match payload {
            wasmparser::Payload::ModuleSection { .. }
            | wasmparser::Payload::ComponentSection { .. } => depth += 1,
            wasmparser::Payload::End(_) => depth = depth.saturating_sub(1),
            wasmparser::Payload::ComponentImportSection(reader) if depth == 0 => {
                for import in reader {
                    let import = import.ok()?;
                    // A world's `use`d types are imported as types equal to
                    // ones the component defines: nothing for the host to give.
                    if let wasmparser::ComponentTypeRef::Type(_) = import.ty {
                        continue;
                    }
                    imports.push(import.name.name.to_owned());
                }
            }
            wasmparser::Payload::ComponentExportSection(reader) if depth == 0 => {
                for export in reader {
                    exports.push(export.ok()?.name.name.to_owned());
                }
            }
            _ => {}
        }
    }
    Some((imports, exports))
}

#[cfg(test)]
mod tests {
    use super::{problems, provided};

    #[test]
    fn a_core_module_is_named_as_one() {
        let module = b"\0asm\x01\0\0\0";
        let found = problems(module);
        assert!(found.len() == 1 && found[0].contains("a core WebAssembly module"), "{found:?}");
    }

    #[test]
    fn the_interfaces_the_host_links_are_provided_and_no_others() {
        for name in [
            "wasi:cli/environment@0.2.0",
            "wasi:io/streams@0.2.10",
            "wasi:http/outgoing-handler@0.2.3",
            "qflow:plugin/host@0.1.0",
            "qflow:plugin/types@0.1.0",
            "qflow:plugin/sql@0.2.0",
        ] {
            assert!(provided(name), "{name}");
        }
        for name in [
            "wasi:cli/environment@0.3.0",
            "wasi:nn/graph@0.2.0",
            "wasi:http/incoming-handler@0.2.0",
            "qflow:plugin/sql@0.1.0",
            "qflow:plugin/host@0.9.0",
            "qflow:plugin/hosts@0.2.0",
            "log",
        ] {
            assert!(!provided(name), "{name}");
        }
    }
}
