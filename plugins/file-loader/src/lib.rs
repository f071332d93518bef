//! Serves the files of a directory the operator grants, as named assets.
//! The flow mounts a host directory into the loader (`dirs`), and `root` in
//! the loader's params says where (default `/data`).

use qflow_sdk::serde::Deserialize;
use qflow_sdk::{Error, Loader, export_loader};

#[derive(Deserialize)]
#[serde(crate = "qflow_sdk::serde", default, deny_unknown_fields)]
struct Params {
    root: String,
}

impl Default for Params {
    fn default() -> Self {
        Params { root: "/data".to_owned() }
    }
}

struct FileLoader;

impl Loader for FileLoader {
    type Params = Params;

    fn load(name: &str, params: Params) -> Result<Vec<u8>, Error> {
        // The sandbox stops any escape from the granted directory; this check
        // only turns an attempt into a clear message.
        if name.is_empty() || name.starts_with('/') || name.split('/').any(|part| part == "..") {
            return Err(Error::new(
                "bad-name",
                format!("{name:?} is not a relative path inside {}", params.root),
            ));
        }
        let path = format!("{}/{name}", params.root.trim_end_matches('/'));
        std::fs::read(&path).map_err(|e| {
            let code = if e.kind() == std::io::ErrorKind::NotFound { "not-found" } else { "io" };
            Error::new(code, format!("{path}: {e}"))
        })
    }
}

export_loader!(FileLoader, "Serves the files of a granted directory as named assets");
