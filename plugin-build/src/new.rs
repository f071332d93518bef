//! `qflow new NAME --lang rust|python|js`: a working step project, a README
//! for it, and a flow that runs it.

use std::path::{Path, PathBuf};

use crate::Error;
use crate::lang::Lang;

/// Where the Rust SDK of this qflow's source tree is: a new Rust step
/// depends on it by path (the SDK is not published).
const RUST_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugins/sdk");

/// Writes a new step project `name` in `dir/name`; the files it wrote.
pub fn new_project(dir: &Path, name: &str, lang: Lang) -> Result<Vec<PathBuf>, Error> {
    // What cargo takes as a package name, Python as a module's and npm as
    // a package's, and the host as a plugin's.
    let valid = name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if !valid {
        return Err(Error::Project(format!(
            "{name:?} is not a plugin name: start with a letter, then letters, digits, `-` and `_`"
        )));
    }
    let root = dir.join(name);
    if root.exists() {
        return Err(Error::Project(format!("{} already exists", root.display())));
    }
    let files: Vec<(&str, String)> = match lang {
        Lang::Rust => rust(name),
        Lang::Python => python(name),
        Lang::JavaScript => js(name),
    };
    let mut written = Vec::new();
    let wrote = files.into_iter().try_for_each(|(file, text)| {
        let path = root.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|source| Error::Io { path: parent.to_path_buf(), source })?;
        }
        std::fs::write(&path, text).map_err(|source| Error::Io { path: path.clone(), source })?;
        written.push(path);
        Ok(())
    });
    match wrote {
        Ok(()) => Ok(written),
        Err(e) => {
            // Half a project would stand in the way of trying again.
            let _ = std::fs::remove_dir_all(&root);
            Err(e)
        }
    }
}

/// The test flow: the step over a sample sentence.
fn flow(name: &str) -> String {
    format!(
        "# Runs the step once: qflow build . --out plugins && qflow run flow.toml --plugins plugins \\\n#   --input '\"the quick brown fox jumps over the lazy dog the end\"'\n[flow]\nname = \"try-{name}\"\n\n[[step]]\nid = \"count\"\nplugin = \"{name}\"\nconfig = {{ top = 2 }}\n"
    )
}

fn readme(name: &str, lang: &str, source: &str, notes: &str) -> String {
    format!(
        "# {name}\n\nA Qflow step in {lang}: it counts the words of its input (text) and returns\n`{{\"words\": N, \"top\": [[word, count], …]}}`, the `top` most common (config, 3 by default).\nThe code is in `{source}`.\n\n```sh\nqflow build . --out plugins        # builds plugins/{name}.wasm\nqflow run flow.toml --plugins plugins --input '\"to be or not to be\"'\n```\n\n{notes}\nA step gets its config (`{{}}` when the flow gives none) once per instance, then\nits input; both are plain values parsed from JSON, and what it returns is\nwritten back as JSON. Anything it raises or throws fails the step with its\nmessage; a `StepError` sets the code and whether a retry may help.\n"
    )
}

fn rust(name: &str) -> Vec<(&'static str, String)> {
    let cargo = format!(
        "[package]\nname = \"{name}\"\nversion = \"0.1.0\"\nedition = \"2024\"\n\n[lib]\ncrate-type = [\"cdylib\"]\n\n[dependencies]\n# The SDK of the qflow source tree this project was made from.\nqflow-sdk = {{ path = {RUST_SDK:?} }}\nserde = {{ version = \"1\", features = [\"derive\"] }}\n\n[profile.release]\nopt-level = \"s\"\nlto = true\nstrip = \"debuginfo\"\n\n[workspace]\n"
    );
    let lib = r#"//! Counts the words of its input.

use std::collections::HashMap;

use qflow_sdk::{Error, Step, export_step};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
#[serde(crate = "qflow_sdk::serde")]
struct Config {
    #[serde(default = "three")]
    top: usize,
}

fn three() -> usize {
    3
}

#[derive(Serialize)]
#[serde(crate = "qflow_sdk::serde")]
struct Count {
    words: usize,
    top: Vec<(String, usize)>,
}

struct WordCount {
    top: usize,
}

impl Step for WordCount {
    type Config = Config;
    type Input = String;
    type Output = Count;

    fn new(config: Config) -> Result<Self, Error> {
        Ok(WordCount { top: config.top })
    }

    fn run(&mut self, text: String) -> Result<Count, Error> {
        let mut counts: HashMap<&str, usize> = HashMap::new();
        for word in text.split_whitespace() {
            *counts.entry(word).or_default() += 1;
        }
        let mut top: Vec<(String, usize)> =
            counts.into_iter().map(|(w, n)| (w.to_owned(), n)).collect();
        top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        top.truncate(self.top);
        Ok(Count { words: text.split_whitespace().count(), top })
    }
}

export_step!(WordCount, "Counts the words of its input");
"#;
    vec![
        ("Cargo.toml", cargo),
        ("src/lib.rs", lib.to_owned()),
        ("flow.toml", flow(name)),
        (
            "README.md",
            readme(
                name,
                "Rust",
                "src/lib.rs",
                "The input type is `String`: any other input fails the step as `bad-input`.\n",
            ),
        ),
    ]
}

fn python(name: &str) -> Vec<(&'static str, String)> {
    let pyproject = format!(
        "[project]\nname = \"{name}\"\nversion = \"0.1.0\"\nrequires-python = \">=3.11\"\n\n[tool.qflow]\n# The module whose @step qflow build packs into {name}.wasm.\nmodule = \"app\"\n"
    );
    let app = r#""""Counts the words of its input."""

from collections import Counter

from qflow_sdk import StepError, log, step


@step(description="Counts the words of its input")
def run(text, config):
    if not isinstance(text, str):
        raise StepError("the input must be text", code="bad-input")
    words = text.split()
    log(f"counting {len(words)} words")
    top = Counter(words).most_common(config.get("top", 3))
    return {"words": len(words), "top": [[w, n] for w, n in top]}
"#;
    let notes = "componentize-py (pinned; `qflow build` installs it in a virtual environment\nunder the cache directory on first use) packs CPython and this module into\nthe component: about 18 MB, compiled once (about 10 s) and then loaded\nfrom the disk cache. An instance starts with about 12 MiB of memory.\n";
    vec![
        ("pyproject.toml", pyproject),
        ("app.py", app.to_owned()),
        ("flow.toml", flow(name)),
        ("README.md", readme(name, "Python", "app.py", notes)),
    ]
}

fn js(name: &str) -> Vec<(&'static str, String)> {
    let package = format!(
        "{{\n  \"name\": \"{name}\",\n  \"version\": \"0.1.0\",\n  \"type\": \"module\",\n  \"main\": \"app.js\"\n}}\n"
    );
    let app = r#"// Counts the words of its input.
import { StepError, log } from "./qflow-sdk.js";

export const step = {
  description: "Counts the words of its input",
  run(text, config) {
    if (typeof text !== "string") throw new StepError("the input must be text", { code: "bad-input" });
    const words = text.split(/\s+/).filter((w) => w.length > 0);
    log(`counting ${words.length} words`);
    const counts = new Map();
    for (const w of words) counts.set(w, (counts.get(w) ?? 0) + 1);
    const top = [...counts].sort((a, b) => b[1] - a[1] || (a[0] < b[0] ? -1 : 1)).slice(0, config.top ?? 3);
    return { words: words.length, top };
  },
};
"#;
    let notes = "componentize-js (pinned; `qflow build` installs it from npm under the cache\ndirectory on first use, and writes `qflow-sdk.js` beside `app.js` on every\nbuild) packs a JavaScript engine and this module into the component: about\n12 MB, compiled once and then loaded from the disk cache. Its `fetch` goes\nthrough the host's HTTP and needs an `http` grant.\n";
    vec![
        ("package.json", package),
        ("app.js", app.to_owned()),
        ("flow.toml", flow(name)),
        ("README.md", readme(name, "JavaScript", "app.js", notes)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_plugin_name_is_one_every_language_and_the_host_take() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        for bad in ["", "1abc", "-x", "a b", "a/b", "../x", "é"] {
            let error = new_project(dir.path(), bad, Lang::Rust).expect_err(bad).to_string();
            assert!(error.contains("is not a plugin name"), "{bad}: {error}");
        }
        assert!(std::fs::read_dir(dir.path()).expect("listed").next().is_none(), "nothing written");
        new_project(dir.path(), "a1-b_c", Lang::Python).expect("a good name");
        assert!(dir.path().join("a1-b_c").join("app.py").is_file());
    }
}
