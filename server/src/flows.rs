//! Flows: those of the flows directory and those registered through the
//! API, by id (a flow's `name`); and the plugins they can use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use qflow::{Flow, FlowError, Format};
use serde::Serialize;
use serde_json::{Value, json};

use crate::{ApiError, AppState, ServeError};

/// A served flow, and the file it lives in (if any).
#[derive(Clone)]
pub(crate) struct Served {
    pub(crate) flow: Arc<Flow>,
    pub(crate) file: Option<PathBuf>,
}

/// The flows, by id.
pub(crate) struct Registry {
    dir: Option<PathBuf>,
    flows: RwLock<BTreeMap<String, Served>>,
}

impl Registry {
    /// The flows of `dir` (every `*.toml` and `*.json`); an invalid one is
    /// logged and skipped, so that one bad file does not keep the server down.
    pub(crate) fn new(dir: Option<PathBuf>) -> Result<Registry, ServeError> {
        let mut flows = BTreeMap::new();
        if let Some(dir) = &dir {
            let entries = std::fs::read_dir(dir)
                .map_err(|source| ServeError::Flows { path: dir.clone(), source })?;
            let mut paths: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
            paths.sort();
            for path in paths {
                if !is_flow_file(&path) {
                    continue;
                }
                match Flow::load(&path) {
                    Ok(flow) => {
                        let served = Served { flow: Arc::new(flow), file: Some(path) };
                        if let Some(other) = flows.insert(served.flow.name.clone(), served) {
                            tracing::warn!(
                                "two files define the flow {}: {} is ignored",
                                other.flow.name,
                                other.file.map(|f| f.display().to_string()).unwrap_or_default()
                            );
                        }
                    }
                    Err(e) => tracing::warn!("skipping a flow that is not valid: {e}"),
                }
            }
        }
        Ok(Registry { dir, flows: RwLock::new(flows) })
    }

    pub(crate) fn get(&self, id: &str) -> Result<Served, ApiError> {
        let flows = self.flows.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        flows.get(id).cloned().ok_or_else(|| ApiError::not_found("flow", id))
    }

    fn all(&self) -> Vec<Served> {
        let flows = self.flows.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        flows.values().cloned().collect()
    }

    pub(crate) fn insert(&self, served: Served) -> bool {
        let mut flows = self.flows.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        flows.insert(served.flow.name.clone(), served).is_some()
    }

    fn remove(&self, id: &str) -> Option<Served> {
        let mut flows = self.flows.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        flows.remove(id)
    }

    /// Reads `path` again after the watcher saw it change: a valid flow
    /// replaces the one of the same name, a removed file takes its flow
    /// away, an invalid one is logged and the old version stays.
    fn changed(&self, path: &Path) {
        if !is_flow_file(path) {
            return;
        }
        if !path.exists() {
            let mut flows = self.flows.write().unwrap_or_else(|poisoned| poisoned.into_inner());
            flows.retain(|_, served| served.file.as_deref() != Some(path));
            return;
        }
        match Flow::load(path) {
            Ok(flow) => {
                self.insert(Served { flow: Arc::new(flow), file: Some(path.to_path_buf()) });
            }
            Err(e) => tracing::warn!("keeping the old version of a flow that is not valid: {e}"),
        }
    }

    /// Where relative paths in registered flows resolve: the flows
    /// directory, else the server's working directory.
    fn base(&self) -> &Path {
        self.dir.as_deref().unwrap_or(Path::new("."))
    }
}

/// `*.toml` or `*.json`, but not a plugin's settings file.
fn is_flow_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "toml" || e == "json")
        && !path.to_string_lossy().ends_with(".plugin.toml")
}

/// Watches the flows directory, like the plugins directory: a changed file
/// is read again after 200 ms of quiet. Dropping the watcher stops it.
pub(crate) fn watch(
    state: &Arc<AppState>,
) -> Option<notify_debouncer_mini::Debouncer<notify_debouncer_mini::notify::RecommendedWatcher>> {
    use notify_debouncer_mini::notify::RecursiveMode;
    let dir = state.flows.dir.clone()?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut debouncer = notify_debouncer_mini::new_debouncer(
        std::time::Duration::from_millis(200),
        move |result| {
            // The receiver goes only when the server does.
            let _ = tx.send(result);
        },
    )
    .inspect_err(|e| tracing::warn!("the flows directory is not watched: {e}"))
    .ok()?;
    if let Err(e) = debouncer.watcher().watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!("the flows directory {} is not watched: {e}", dir.display());
        return None;
    }
    let weak = Arc::downgrade(state);
    tokio::spawn(async move {
        while let Some(result) = rx.recv().await {
            let Some(state) = weak.upgrade() else { break };
            match result {
                Ok(events) => {
                    for event in events {
                        state.flows.changed(&event.path);
                    }
                }
                Err(e) => tracing::warn!("watching the flows directory failed: {e}"),
            }
        }
    });
    Some(debouncer)
}

/// A flow, as the API lists it.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Summary<'a> {
    id: &'a str,
    description: Option<&'a str>,
    steps: Vec<&'a str>,
    max_parallel: Option<usize>,
    format: Format,
    #[schema(value_type = Option<String>)]
    file: Option<&'a Path>,
}

fn summary(served: &Served) -> Summary<'_> {
    let flow = &served.flow;
    Summary {
        id: &flow.name,
        description: flow.description.as_deref(),
        steps: flow.steps.iter().map(|s| s.id.as_str()).collect(),
        max_parallel: flow.max_parallel,
        format: flow.format,
        file: served.file.as_deref(),
    }
}

/// The flows.
#[utoipa::path(get, path = "/api/v1/flows", responses((status = 200, body = [Summary<'static>])))]
pub(crate) async fn list(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let flows = state.flows.all();
    Json(flows.iter().map(summary).collect::<Vec<_>>()).into_response()
}

/// A flow, with its text and plan.
#[utoipa::path(get, path = "/api/v1/flows/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = crate::error::Body<'static>)))]
pub(crate) async fn show(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let served = state.flows.get(&id)?;
    let plan = state.host.plan(&served.flow);
    let mut body = serde_json::to_value(summary(&served)).unwrap_or_default();
    body["text"] = json!(&*served.flow.text);
    body["plan"] = serde_json::to_value(&plan).unwrap_or_default();
    // What a drawing of the graph needs: each step, its plugin and needs.
    body["graph"] = served
        .flow
        .steps
        .iter()
        .map(|s| json!({ "id": s.id, "plugin": s.plugin.to_string(), "needs": s.needs }))
        .collect();
    Ok(Json(body))
}

/// An invalid flow: 422 with every problem.
pub(crate) fn invalid(error: &FlowError) -> ApiError {
    let problems: Vec<String> = error.problems.iter().map(ToString::to_string).collect();
    ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-flow", error.to_string())
        .details(json!({ "problems": problems }))
}

/// `POST /flows`: the body is a flow document — JSON, or TOML with
/// `content-type: application/toml`. It is validated completely (the
/// plugins it names included) before it replaces anything.
#[utoipa::path(post, path = "/api/v1/flows",
    request_body(content = Object, description = "a flow document: JSON, or TOML with content-type application/toml"),
    responses((status = 201, body = Summary<'static>), (status = 200, body = Summary<'static>),
        (status = 400, body = crate::error::Body<'static>), (status = 413, body = crate::error::Body<'static>),
        (status = 422, body = crate::error::Body<'static>)))]
pub(crate) async fn register(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let body = body?;
    let text = std::str::from_utf8(&body)
        .map_err(|e| ApiError::bad_request("bad-body", format!("the body is not UTF-8: {e}")))?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("application/json");
    let format = if content_type.contains("toml") { Format::Toml } else { Format::Json };
    // Malformed text is a bad request; well-formed text that is not a
    // valid flow is unprocessable, with every problem listed.
    match format {
        Format::Json => {
            serde_json::from_str::<Value>(text).map_err(|e| {
                ApiError::bad_request("bad-json", format!("the body is not JSON: {e}"))
            })?;
        }
        Format::Toml => {
            text.parse::<toml::Table>().map_err(|e| {
                ApiError::bad_request("bad-toml", format!("the body is not TOML: {e}"))
            })?;
        }
    }
    let flow =
        Flow::parse(text, format, "request body", state.flows.base()).map_err(|e| invalid(&e))?;
    state.host.check(&flow).map_err(|e| invalid(&e))?;
    // The flow's name is a plain name (validated like a step id), so the
    // file stays inside the flows directory. A flow that replaces one read
    // from another file takes that file's place.
    let previous = state.flows.get(&flow.name).ok().and_then(|served| served.file);
    let file = state.flows.dir.as_ref().map(|dir| {
        let extension = match format {
            Format::Toml => "toml",
            Format::Json => "json",
        };
        dir.join(format!("{}.{extension}", flow.name))
    });
    if let Some(file) = &file {
        qflow::model::optimize::write_atomically(file, text).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "storage",
                format!("cannot write {}: {e}", file.display()),
            )
        })?;
        if let Some(previous) = previous.filter(|previous| previous != file)
            && let Err(e) = std::fs::remove_file(&previous)
        {
            tracing::warn!(
                "{} was replaced by {} but stays: {e}",
                previous.display(),
                file.display()
            );
        }
    }
    let served = Served { flow: Arc::new(flow), file };
    let replaced = state.flows.insert(served.clone());
    let status = if replaced { StatusCode::OK } else { StatusCode::CREATED };
    Ok((status, Json(serde_json::to_value(summary(&served)).unwrap_or_default())))
}

/// Removes a flow (and its file).
#[utoipa::path(delete, path = "/api/v1/flows/{id}", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = crate::error::Body<'static>)))]
pub(crate) async fn remove(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let served = state.flows.remove(&id).ok_or_else(|| ApiError::not_found("flow", &id))?;
    if let Some(file) = served.file
        && let Err(e) = std::fs::remove_file(&file)
    {
        tracing::warn!("flow {id} is gone from the API but {} stays: {e}", file.display());
    }
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /plugins`: every plugin, described (compiling what is not yet).
#[utoipa::path(get, path = "/api/v1/plugins", responses((status = 200, body = [qflow::PluginInfo])))]
pub(crate) async fn plugins(
    State(state): State<Arc<AppState>>,
) -> Result<impl IntoResponse, ApiError> {
    let described = state.host.catalog().describe_all().await.map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "plugins", qflow::error_chain(&e))
    })?;
    let entries: Vec<Value> = described
        .iter()
        .map(|(name, d)| match d {
            Ok(info) => serde_json::to_value(info).unwrap_or_default(),
            Err(e) => json!({ "name": name, "error": qflow::error_chain(e) }),
        })
        .collect();
    Ok(Json(entries))
}
