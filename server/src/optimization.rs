//! The optimization service: the metrics document, pool figures, and a
//! flow's recommendations and optimization (previewed, or written back).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use qflow::model::optimize::{self, Level};
use serde::Deserialize;
use serde_json::json;

use crate::error::json_body;
use crate::flows::Served;
use crate::{ApiError, AppState};

/// The optimization metrics document.
#[utoipa::path(get, path = "/api/v1/optimization/metrics",
    responses((status = 200, body = qflow::OptimizationMetrics)))]
pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    Json(state.host.metrics(state.config.level.as_str()))
}

/// The resource pools, by kind.
#[utoipa::path(get, path = "/api/v1/optimization/pools/stats",
    responses((status = 200, body = qflow::model::ResourcePools)))]
pub(crate) async fn pools(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    Json(state.host.resource_pools())
}

/// How many of a flow's past runs (the newest, from the run store) the
/// optimizer weighs.
const PAST_RUNS: u32 = 200;

/// What could make a flow better, with the evidence.
#[utoipa::path(get, path = "/api/v1/flows/{id}/recommendations", params(("id" = String, Path)),
    responses((status = 200, body = Object), (status = 404, body = crate::error::Body<'static>)))]
pub(crate) async fn recommendations(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<impl IntoResponse, ApiError> {
    let served = state.flows.get(&id)?;
    let runs = state.host.past_runs(&id, PAST_RUNS).await.map_err(ApiError::store)?;
    let count = runs.len();
    let recommendations = state.host.recommend(&served.flow, runs);
    Ok(Json(json!({ "flow": id, "runs": count, "recommendations": recommendations })))
}

/// `POST /flows/{id}/optimize`.
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct OptimizeRequest {
    level: Option<Level>,
    #[serde(default)]
    apply: bool,
}

/// Rewrites a flow at a level: the changes, a diff, the new text; with
/// `apply`, written back (the old file kept as `.bak`).
#[utoipa::path(post, path = "/api/v1/flows/{id}/optimize", params(("id" = String, Path)),
    request_body = OptimizeRequest,
    responses((status = 200, body = Object), (status = 404, body = crate::error::Body<'static>),
        (status = 422, body = crate::error::Body<'static>)))]
pub(crate) async fn optimize(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let request: OptimizeRequest = json_body(&body?)?;
    let served = state.flows.get(&id)?;
    let level = request.level.unwrap_or(state.config.level);
    let runs = state.host.past_runs(&id, PAST_RUNS).await.map_err(ApiError::store)?;
    let optimized = state.host.optimize(&served.flow, level, runs).map_err(|e| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "optimizer", qflow::error_chain(&e))
    })?;
    let diff = optimized.diff(&served.flow);
    let applied = request.apply && !optimized.is_unchanged();
    if applied {
        if let Some(file) = &served.file {
            optimize::apply(file, &optimized.text).map_err(|e| {
                let what = format!("cannot write {}: {e}", file.display());
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "storage", what)
            })?;
        }
        let flow = Arc::new(optimized.flow.clone());
        state.flows.insert(Served { flow, file: served.file.clone() });
    }
    Ok(Json(json!({
        "flow": id,
        "level": level,
        "applied": applied,
        "changes": optimized.changes,
        "diff": diff,
        "text": optimized.text,
    })))
}
