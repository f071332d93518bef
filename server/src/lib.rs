//! `qflow serve`: Qflow's HTTP API under `/api/v1` (flows, runs,
//! optimization, plugins, server-sent events), Prometheus metrics at
//! `/metrics`, and `/healthz`.
//!
//! [`app`] builds the whole router from a state, so tests can call it with
//! `tower::ServiceExt::oneshot` or serve it on an ephemeral port; [`serve`]
//! runs it until shutdown, then lets the runs in flight finish.
#![deny(missing_docs)]

mod dashboard;
mod error;
mod events;
mod flows;
mod metrics;
mod optimization;
mod runs;

/// The OpenAPI document, generated from the handlers and their types.
#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Qflow",
        description = "Flows of WebAssembly-component steps: run them, and optimize them."
    ),
    paths(
        flows::list,
        flows::register,
        flows::show,
        flows::remove,
        flows::plugins,
        runs::start,
        runs::list,
        runs::show,
        runs::cancel,
        runs::events,
        runs::metrics_history,
        optimization::metrics,
        optimization::pools,
        optimization::recommendations,
        optimization::optimize,
        events::stream,
        events::history,
        metrics::prometheus,
        healthz,
        openapi,
        dashboard::index
    ),
    components(schemas(error::Body<'static>, qflow::Plan, qflow::model::optimize::Recommendation))
)]
struct ApiDoc;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use qflow::Host;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::error::ApiError;

/// How the server is set up.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Where it listens: loopback by default. Any other address needs a token.
    pub addr: SocketAddr,
    /// A directory of flow files (`*.toml`, `*.json`) to serve, and where
    /// flows registered through the API are written.
    pub flows_dir: Option<PathBuf>,
    /// The bearer token every request must carry (required off loopback).
    pub token: Option<String>,
    /// The optimization level `optimize` uses when a request names none.
    pub level: qflow::model::optimize::Level,
    /// How long runs in flight may take to finish after a shutdown signal.
    pub grace: Duration,
    /// The largest request body, in bytes.
    pub max_body_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            flows_dir: None,
            token: None,
            level: Default::default(),
            grace: Duration::from_secs(30),
            // Flows and inputs are JSON documents; 16 MiB is far above
            // either and far below what would hurt the server.
            max_body_bytes: 16 << 20,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// A non-loopback address without a token would open the API to anyone.
    #[error("refusing to listen on {0} without a token: set --token or QFLOW_TOKEN")]
    NoToken(SocketAddr),
    /// The flows directory could not be read.
    #[error("cannot read the flows directory {path}")]
    Flows {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The host keeps no runs: a server answers for runs only once they
    /// are in a run store.
    #[error("the server needs a host that keeps its runs (Host::with_store)")]
    NoStore,
    /// The address could not be bound, or serving failed.
    #[error("cannot serve on {addr}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What every handler shares.
pub struct AppState {
    host: Arc<Host>,
    /// The host's run store: the record of every run.
    store: Arc<dyn qflow::model::RunStore>,
    config: ServerConfig,
    flows: flows::Registry,
    runs: runs::Registry,
    metrics: metrics::Metrics,
    /// Cancelled at shutdown: no new run is accepted, event streams end.
    shutdown: CancellationToken,
    /// The runs in flight, which shutdown waits for.
    tracker: TaskTracker,
    /// Every run's cancel token is a child of this one: cancelled when the
    /// grace period at shutdown is over.
    runs_cancel: CancellationToken,
    /// The flows directory's watcher, while the state lives.
    flows_watch: std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>,
}

impl AppState {
    /// A server's state on `host`, with the flows of `config.flows_dir`.
    pub fn new(host: Arc<Host>, config: ServerConfig) -> Result<Arc<AppState>, ServeError> {
        let flows = flows::Registry::new(config.flows_dir.clone())?;
        let store = host.store().cloned().ok_or(ServeError::NoStore)?;
        Ok(Arc::new(AppState {
            store,
            metrics: metrics::Metrics::new(host.clone()),
            host,
            config,
            flows,
            runs: runs::Registry::default(),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
            runs_cancel: CancellationToken::new(),
            flows_watch: std::sync::Mutex::new(None),
        }))
    }

    /// Watches the flows directory (if there is one) until the state goes:
    /// flow files changed, added or removed there are served as they are
    /// now. Must be called inside a tokio runtime.
    pub fn watch_flows(self: &Arc<Self>) {
        let watch = flows::watch(self).map(|w| Box::new(w) as Box<dyn std::any::Any + Send>);
        *self.flows_watch.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = watch;
    }

    /// The host the server runs flows on.
    pub fn host(&self) -> &Arc<Host> {
        &self.host
    }

    /// The run store.
    pub(crate) fn store(&self) -> &Arc<dyn qflow::model::RunStore> {
        &self.store
    }

    /// Stops accepting new runs and ends the event streams.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
        self.tracker.close();
    }

    /// Waits for the runs in flight, up to `grace`, then cancels what is
    /// left (its summary says so) and waits for that; whether all had ended
    /// in time.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.tracker.close();
        if tokio::time::timeout(grace, self.tracker.wait()).await.is_ok() {
            return true;
        }
        self.runs_cancel.cancel();
        // Cancelled steps are cut at once; this bounds a host call that is not.
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await;
        false
    }
}

/// The whole HTTP app.
pub fn app(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/flows", get(flows::list).post(flows::register))
        .route("/flows/{id}", get(flows::show).delete(flows::remove))
        .route("/flows/{id}/runs", post(runs::start))
        .route("/flows/{id}/recommendations", get(optimization::recommendations))
        .route("/flows/{id}/optimize", post(optimization::optimize))
        .route("/runs", get(runs::list))
        .route("/runs/{id}", get(runs::show))
        .route("/runs/{id}/events", get(runs::events))
        .route("/runs/{id}/cancel", post(runs::cancel))
        .route("/optimization/metrics", get(optimization::metrics))
        .route("/optimization/metrics/history", get(runs::metrics_history))
        .route("/optimization/pools/stats", get(optimization::pools))
        .route("/plugins", get(flows::plugins))
        .route("/events", get(events::stream))
        .route("/events/history", get(events::history))
        .route("/openapi.json", get(openapi));
    Router::new()
        .nest("/api/v1", api)
        .merge(dashboard::routes())
        .route("/metrics", get(metrics::prometheus))
        .route("/healthz", get(healthz))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(middleware::from_fn_with_state(state.clone(), authorize))
        .with_state(state)
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", responses((status = 200, description = "OpenAPI 3.1")))]
async fn openapi() -> impl IntoResponse {
    axum::Json(<ApiDoc as utoipa::OpenApi>::openapi())
}

/// Whether the server is up.
#[utoipa::path(get, path = "/healthz", responses((status = 200, body = Object)))]
async fn healthz() -> impl IntoResponse {
    axum::Json(serde_json::json!({"status": "ok"}))
}

async fn not_found(request: Request) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not-found", format!("no route {}", request.uri().path()))
}

/// With a token configured, every request must carry it as a bearer token.
/// Without one (loopback), a request must name a loopback host, so that a
/// web page cannot reach the API through a rebound DNS name. A body must
/// say it is JSON or TOML: a page can send `text/plain` across origins
/// without asking, but not these.
async fn authorize(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let has_body = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|length| length != "0")
        || request.headers().contains_key(header::TRANSFER_ENCODING);
    if has_body {
        let content_type = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        let essence = content_type.split(';').next().unwrap_or_default().trim();
        if !matches!(essence, "application/json" | "application/toml") {
            let error = ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported-media-type",
                format!(
                    "a body must be application/json or application/toml, not {content_type:?}"
                ),
            );
            return error.into_response();
        }
    }
    if state.config.token.is_none() {
        let host = request
            .headers()
            .get(header::HOST)
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default();
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
            _ => host,
        };
        if !matches!(name, "localhost" | "127.0.0.1" | "[::1]" | "") {
            let error = ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden-host",
                format!(
                    "this server answers only to a loopback host, not {host:?}; set a token to serve others"
                ),
            );
            return error.into_response();
        }
    }
    // The dashboard's files hold no data: served to anyone who may reach
    // the server (its API calls carry the token).
    if let Some(token) =
        state.config.token.as_ref().filter(|_| !dashboard::is_dashboard(request.uri().path()))
    {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.strip_prefix("Bearer "));
        if given != Some(token.as_str()) {
            let error = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "this server requires `Authorization: Bearer <token>`",
            );
            return error.into_response();
        }
    }
    next.run(request).await
}

/// Serves `state` on `config.addr` until `signal` resolves; then stops
/// accepting runs and lets the ones in flight finish (up to the grace
/// period). `ready` learns the bound address (port 0 picks one).
pub async fn serve(
    state: Arc<AppState>,
    signal: impl Future<Output = ()> + Send + 'static,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    let addr = state.config.addr;
    if !addr.ip().is_loopback() && state.config.token.is_none() {
        return Err(ServeError::NoToken(addr));
    }
    let io = |source| ServeError::Io { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(io)?;
    ready(listener.local_addr().map_err(io)?);
    let shutdown = {
        let state = state.clone();
        async move {
            signal.await;
            tracing::info!("shutting down: no new runs; waiting for the runs in flight");
            state.begin_shutdown();
        }
    };
    let grace = state.config.grace;
    axum::serve(listener, app(state.clone())).with_graceful_shutdown(shutdown).await.map_err(io)?;
    if !state.drain(grace).await {
        tracing::warn!("runs still in flight after the grace period of {grace:?} were cancelled");
    }
    Ok(())
}
