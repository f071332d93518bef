//! Runs: started through the API (waited for, or answered at once with
//! their id), listed, read and cancelled. Kept in memory, the newest
//! `KEEP` of them.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use qflow::model::RunState;
use qflow::{RunOptions, RunSummary};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::error::json_body;
use crate::{ApiError, AppState};

/// How many finished runs are kept in memory.
const KEEP: usize = 10_000;

/// One run.
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Record {
    run_id: String,
    flow: String,
    status: RunState,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String)]
    started_at: SystemTime,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<RunSummary>,
    /// Why it ended without a summary (it could not start).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(skip)]
    cancel: CancellationToken,
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*time))
}

#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Record>,
    /// Oldest first.
    order: VecDeque<String>,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn started(&self, record: Record) {
        let mut inner = self.lock();
        inner.order.push_back(record.run_id.clone());
        inner.by_id.insert(record.run_id.clone(), record);
        while inner.order.len() > KEEP {
            // Forget the oldest finished run; a running one stays.
            let Some(position) = inner
                .order
                .iter()
                .position(|id| inner.by_id.get(id).is_none_or(|r| r.status != RunState::Running))
            else {
                break;
            };
            if let Some(id) = inner.order.remove(position) {
                inner.by_id.remove(&id);
            }
        }
    }

    fn finished(&self, summary: &RunSummary) {
        if let Some(record) = self.lock().by_id.get_mut(&summary.run_id) {
            record.status = summary.status.into();
            record.summary = Some(summary.clone());
        }
    }

    /// The summaries of `flow`'s finished runs, oldest first.
    pub(crate) fn summaries_of(&self, flow: &str) -> Vec<RunSummary> {
        let inner = self.lock();
        inner
            .order
            .iter()
            .filter_map(|id| inner.by_id.get(id))
            .filter(|r| r.flow == flow)
            .filter_map(|r| r.summary.clone())
            .collect()
    }

    /// A run that could not start (or whose task failed): it ended.
    fn failed(&self, run_id: &str, error: String) {
        if let Some(record) = self.lock().by_id.get_mut(run_id) {
            record.status = RunState::Failed;
            record.error = Some(error);
        }
    }

    fn get(&self, id: &str) -> Option<Record> {
        self.lock().by_id.get(id).cloned()
    }
}

/// `POST /flows/{id}/runs`.
#[derive(Deserialize, Default, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartRun {
    #[serde(default)]
    #[schema(value_type = Object)]
    input: Value,
    #[serde(default)]
    wait: bool,
    max_parallel: Option<usize>,
}

/// Starts a run: with `wait`, the summary; else 202 and the run's id.
#[utoipa::path(post, path = "/api/v1/flows/{id}/runs", params(("id" = String, Path)),
    request_body = StartRun,
    responses((status = 200, body = qflow::RunSummary), (status = 202, body = Object),
        (status = 404, body = crate::error::Body<'static>), (status = 422, body = crate::error::Body<'static>),
        (status = 503, body = crate::error::Body<'static>)))]
pub(crate) async fn start(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let request: StartRun = json_body(&body?)?;
    let served = state.flows.get(&id)?;
    if state.shutdown.is_cancelled() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting-down",
            "the server is shutting down and accepts no new runs",
        ));
    }
    state.host.check(&served.flow).map_err(|e| crate::flows::invalid(&e))?;
    let run_id = uuid::Uuid::new_v4().to_string();
    // A child of the server's: what is still running after the grace
    // period at shutdown is cut.
    let cancel = state.runs_cancel.child_token();
    // An intermediate output over 1 MiB is kept as its digest once the
    // steps that need it have it: a flow from the network cannot make the
    // server hold every large output of a long chain.
    let mut options = RunOptions::new()
        .run_id(run_id.clone())
        .cancel(cancel.clone())
        .retain_output_bytes(1 << 20);
    options.max_parallel = request.max_parallel;
    state.runs.started(Record {
        run_id: run_id.clone(),
        flow: id.clone(),
        status: RunState::Running,
        started_at: SystemTime::now(),
        summary: None,
        error: None,
        cancel,
    });
    // The run belongs to the server, not to the request: a client that
    // goes away does not cut it, and shutdown waits for it.
    let task = {
        let state = state.clone();
        let flow = served.flow.clone();
        let run_id = run_id.clone();
        state.tracker.clone().spawn(async move {
            // Its own task: a panic in the run is a failed run, not a lost one.
            let host = state.host.clone();
            let running =
                tokio::spawn(async move { host.run_with(&flow, request.input, options).await });
            match running.await {
                Ok(Ok(summary)) => {
                    state.metrics.record(&summary);
                    state.runs.finished(&summary);
                    Ok(summary)
                }
                Ok(Err(e)) => {
                    let error = e.to_string();
                    tracing::warn!(
                        "run {run_id} could not start: {}",
                        qflow::model::printable(&error)
                    );
                    state.runs.failed(&run_id, error.clone());
                    Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-flow", error))
                }
                Err(e) => {
                    let error = format!("the run failed in the server: {e}");
                    tracing::error!("run {run_id}: {error}");
                    state.runs.failed(&run_id, error.clone());
                    Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", error))
                }
            }
        })
    };
    if !request.wait {
        let body = serde_json::json!({
            "run_id": run_id,
            "status": RunState::Running,
            "links": { "run": format!("/api/v1/runs/{run_id}") },
        });
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    // A shutdown must not wait on this request: answer with the id then,
    // and let the run finish within the grace period.
    tokio::select! {
        joined = task => match joined {
            Ok(Ok(summary)) => Ok(Json(summary).into_response()),
            Ok(Err(error)) => Err(error),
            Err(e) => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the run failed in the server: {e}"),
            )),
        },
        () = state.shutdown.cancelled() => {
            let body = serde_json::json!({ "run_id": run_id, "status": RunState::Running });
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
    }
}

/// A run, with its summary once it ended.
#[utoipa::path(get, path = "/api/v1/runs/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Record), (status = 404, body = crate::error::Body<'static>)))]
pub(crate) async fn show(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Record>, ApiError> {
    state.runs.get(&id).map(Json).ok_or_else(|| ApiError::not_found("run", &id))
}

/// `GET /runs?flow=&status=&limit=`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    flow: Option<String>,
    status: Option<RunState>,
    limit: Option<usize>,
}

/// Runs, newest first.
#[utoipa::path(get, path = "/api/v1/runs", params(ListQuery),
    responses((status = 200, body = [Record]), (status = 400, body = crate::error::Body<'static>)))]
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Record>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad-query", e.body_text()))?;
    let limit = query.limit.unwrap_or(100).min(KEEP);
    let inner = state.runs.lock();
    let runs = inner
        .order
        .iter()
        .rev()
        .filter_map(|id| inner.by_id.get(id))
        .filter(|r| query.flow.as_ref().is_none_or(|f| &r.flow == f))
        .filter(|r| query.status.is_none_or(|s| r.status == s))
        .take(limit)
        .map(|r| Record {
            run_id: r.run_id.clone(),
            flow: r.flow.clone(),
            status: r.status,
            started_at: r.started_at,
            summary: None,
            error: r.error.clone(),
            cancel: r.cancel.clone(),
        })
        .collect();
    Ok(Json(runs))
}

/// Cancels a running run.
#[utoipa::path(post, path = "/api/v1/runs/{id}/cancel", params(("id" = String, Path)),
    responses((status = 202, body = Object), (status = 404, body = crate::error::Body<'static>),
        (status = 409, body = crate::error::Body<'static>)))]
pub(crate) async fn cancel(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    let record = state.runs.get(&id).ok_or_else(|| ApiError::not_found("run", &id))?;
    if record.status != RunState::Running {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "not-running",
            format!("run `{id}` has already ended ({:?})", record.status).to_lowercase(),
        ));
    }
    record.cancel.cancel();
    let body = serde_json::json!({ "run_id": id, "status": "cancelling" });
    Ok((StatusCode::ACCEPTED, Json(body)).into_response())
}
