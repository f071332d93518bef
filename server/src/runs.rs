//! Runs: started through the API (waited for, or answered at once with
//! their id), listed, read, their events, and cancelled. The run store is
//! the record: a run is answered for only once its start is stored, so a
//! server that dies leaves it interrupted, never forgotten. What lives here
//! in memory is only what a stored run cannot carry: the cancel tokens of
//! runs in flight, and runs that could not start.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use qflow::model::{MetricsSnapshot, RunQuery, RunRecord, RunState};
use qflow::{Event, RunOptions};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::error::json_body;
use crate::{ApiError, AppState};

/// A run as the API shows it: the stored record, its times as RFC 3339.
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Record {
    run_id: String,
    flow: String,
    status: RunState,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String)]
    started_at: SystemTime,
    #[serde(serialize_with = "rfc3339_opt", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    ended_at: Option<SystemTime>,
    #[schema(value_type = Object)]
    input: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    summary: Option<qflow::RunSummary>,
    /// Why it ended without a summary (it could not start).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// A run in a list: what a table of runs shows.
#[derive(Clone, Serialize, utoipa::ToSchema)]
pub(crate) struct Line {
    run_id: String,
    flow: String,
    status: RunState,
    #[serde(serialize_with = "rfc3339")]
    #[schema(value_type = String)]
    started_at: SystemTime,
    #[serde(serialize_with = "rfc3339_opt", skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    ended_at: Option<SystemTime>,
    #[serde(skip_serializing_if = "Option::is_none")]
    wall_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    efficiency: Option<f64>,
    /// Steps in all, and how many failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    steps: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    failed_steps: Option<usize>,
}

fn at(ms: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl From<RunRecord> for Record {
    fn from(record: RunRecord) -> Record {
        Record {
            started_at: at(record.started_at_ms),
            ended_at: record.ended_at_ms.map(at),
            run_id: record.run_id,
            flow: record.flow,
            status: record.status,
            input: record.input,
            summary: record.summary,
            error: None,
        }
    }
}

impl From<RunRecord> for Line {
    fn from(record: RunRecord) -> Line {
        let summary = record.summary.as_ref();
        Line {
            started_at: at(record.started_at_ms),
            ended_at: record.ended_at_ms.map(at),
            wall_ms: summary.map(|s| s.wall_ms),
            efficiency: summary.map(|s| s.efficiency),
            steps: summary.map(|s| s.steps.len()),
            failed_steps: summary.map(|s| {
                s.steps.iter().filter(|step| step.status == qflow::StepStatus::Failed).count()
            }),
            run_id: record.run_id,
            flow: record.flow,
            status: record.status,
        }
    }
}

fn rfc3339<S: serde::Serializer>(time: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*time))
}

fn rfc3339_opt<S: serde::Serializer>(time: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match time {
        Some(time) => rfc3339(time, s),
        None => s.serialize_none(),
    }
}

/// What the server holds in memory of runs: the cancel tokens of those in
/// flight, and those that could not start (they never reached the store).
#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    running: HashMap<String, CancellationToken>,
    /// The newest runs that could not start, by id.
    failed: HashMap<String, Record>,
}

/// How many runs that could not start are remembered.
const FAILED_KEPT: usize = 1000;

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn started(&self, run_id: &str, cancel: CancellationToken) {
        self.lock().running.insert(run_id.to_owned(), cancel);
    }

    fn ended(&self, run_id: &str) {
        self.lock().running.remove(run_id);
    }

    /// A run that could not start (or whose task failed): it ended.
    fn failed(&self, record: Record) {
        let mut inner = self.lock();
        inner.running.remove(&record.run_id);
        if inner.failed.len() >= FAILED_KEPT {
            inner.failed.clear();
        }
        inner.failed.insert(record.run_id.clone(), record);
    }

    fn cancel_token(&self, run_id: &str) -> Option<CancellationToken> {
        self.lock().running.get(run_id).cloned()
    }

    fn failed_run(&self, run_id: &str) -> Option<Record> {
        self.lock().failed.get(run_id).cloned()
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
    let stored = Arc::new(tokio::sync::Notify::new());
    let mut options = RunOptions::new()
        .run_id(run_id.clone())
        .cancel(cancel.clone())
        .retain_output_bytes(1 << 20)
        .durable();
    options.stored = Some(stored.clone());
    options.max_parallel = request.max_parallel;
    state.runs.started(&run_id, cancel);
    let started_at = SystemTime::now();
    // The run belongs to the server, not to the request: a client that
    // goes away does not cut it, and shutdown waits for it.
    let mut task = {
        let state = state.clone();
        let flow = served.flow.clone();
        let (run_id, flow_id) = (run_id.clone(), id.clone());
        let input = request.input.clone();
        state.tracker.clone().spawn(async move {
            // Its own task: a panic in the run is a failed run, not a lost one.
            let host = state.host.clone();
            let running = tokio::spawn(async move { host.run_with(&flow, input, options).await });
            let failed = |error: String| Record {
                run_id: run_id.clone(),
                flow: flow_id.clone(),
                status: RunState::Failed,
                started_at,
                ended_at: Some(SystemTime::now()),
                input: Value::Null,
                summary: None,
                error: Some(error),
            };
            match running.await {
                Ok(Ok(summary)) => {
                    state.metrics.record(&summary);
                    state.runs.ended(&run_id);
                    Ok(summary)
                }
                Ok(Err(e)) => {
                    let error = e.to_string();
                    tracing::warn!(
                        "run {run_id} could not start: {}",
                        qflow::model::printable(&error)
                    );
                    state.runs.failed(failed(error.clone()));
                    Err(ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-flow", error))
                }
                Err(e) => {
                    let error = format!("the run failed in the server: {e}");
                    tracing::error!("run {run_id}: {error}");
                    state.runs.failed(failed(error.clone()));
                    Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", error))
                }
            }
        })
    };
    // Answered only once the run's start is in the store (or it could not
    // start): a server that dies after this answer leaves it interrupted,
    // never forgotten.
    let refused = tokio::select! {
        biased;
        () = stored.notified() => None,
        joined = &mut task => Some(joined),
    };
    let answer = |joined: Result<Result<qflow::RunSummary, ApiError>, tokio::task::JoinError>| {
        match joined {
            Ok(Ok(summary)) => Ok(Json(summary).into_response()),
            Ok(Err(error)) => Err(error),
            Err(e) => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the run failed in the server: {e}"),
            )),
        }
    };
    if let Some(joined) = refused {
        return answer(joined);
    }
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
        joined = task => answer(joined),
        () = state.shutdown.cancelled() => {
            let body = serde_json::json!({ "run_id": run_id, "status": RunState::Running });
            Ok((StatusCode::ACCEPTED, Json(body)).into_response())
        }
    }
}

/// A run, with its summary once it ended: from the run store, so runs
/// before a restart answer too.
#[utoipa::path(get, path = "/api/v1/runs/{id}", params(("id" = String, Path)),
    responses((status = 200, body = Record), (status = 404, body = crate::error::Body<'static>)))]
pub(crate) async fn show(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Record>, ApiError> {
    if let Some(record) = state.store().run(&id).await.map_err(ApiError::store)? {
        return Ok(Json(record.into()));
    }
    state.runs.failed_run(&id).map(Json).ok_or_else(|| ApiError::not_found("run", &id))
}

/// `GET /runs?flow=&status=&limit=&before=`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    /// Only this flow's runs.
    flow: Option<String>,
    /// Only runs in this state.
    status: Option<RunState>,
    /// At most this many (100; at most 1000).
    limit: Option<u32>,
    /// The next page: runs that started before this one (the last of the
    /// previous page).
    before: Option<String>,
}

/// The most runs one page holds.
const PAGE_MAX: u32 = 1000;

/// Runs, newest first, a page at a time, from the run store.
#[utoipa::path(get, path = "/api/v1/runs", params(ListQuery),
    responses((status = 200, body = [Line]), (status = 400, body = crate::error::Body<'static>)))]
pub(crate) async fn list(
    State(state): State<Arc<AppState>>,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<Line>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad-query", e.body_text()))?;
    let mut store_query = RunQuery::newest(query.limit.unwrap_or(100).clamp(1, PAGE_MAX));
    store_query.flow = query.flow;
    store_query.status = query.status;
    store_query.before = query.before;
    let records = state.store().runs(store_query).await.map_err(ApiError::store)?;
    Ok(Json(records.into_iter().map(Line::from).collect()))
}

/// A finished run's events, in order, as the store keeps them (a run in
/// flight shows its events on `GET /events?run=`).
#[utoipa::path(get, path = "/api/v1/runs/{id}/events", params(("id" = String, Path)),
    responses((status = 200, body = [Object]), (status = 404, body = crate::error::Body<'static>)))]
pub(crate) async fn events(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Vec<Event>>, ApiError> {
    let store = state.store();
    if store.run(&id).await.map_err(ApiError::store)?.is_none() {
        return Err(ApiError::not_found("run", &id));
    }
    Ok(Json(store.events(&id).await.map_err(ApiError::store)?))
}

/// `GET /optimization/metrics/history?since=&limit=`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryQuery {
    /// Snapshots taken at or after this time, in ms since the Unix epoch.
    since: Option<i64>,
    /// At most this many, the newest (500; at most 5000).
    limit: Option<u32>,
}

/// The metrics document as it was every 10 s while runs ended: the
/// dashboard's time series.
#[utoipa::path(get, path = "/api/v1/optimization/metrics/history", params(HistoryQuery),
    responses((status = 200, body = [MetricsSnapshot]), (status = 400, body = crate::error::Body<'static>)))]
pub(crate) async fn metrics_history(
    State(state): State<Arc<AppState>>,
    query: Result<Query<HistoryQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<MetricsSnapshot>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad-query", e.body_text()))?;
    let limit = query.limit.unwrap_or(500).clamp(1, 5000);
    let snapshots =
        state.store().metrics(query.since.unwrap_or(0), limit).await.map_err(ApiError::store)?;
    Ok(Json(snapshots))
}

/// Cancels a running run.
#[utoipa::path(post, path = "/api/v1/runs/{id}/cancel", params(("id" = String, Path)),
    responses((status = 202, body = Object), (status = 404, body = crate::error::Body<'static>),
        (status = 409, body = crate::error::Body<'static>)))]
pub(crate) async fn cancel(
    State(state): State<Arc<AppState>>,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    if let Some(cancel) = state.runs.cancel_token(&id) {
        cancel.cancel();
        let body = serde_json::json!({ "run_id": id, "status": "cancelling" });
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    let status = match state.store().run(&id).await.map_err(ApiError::store)? {
        Some(record) => record.status,
        None => match state.runs.failed_run(&id) {
            Some(record) => record.status,
            None => return Err(ApiError::not_found("run", &id)),
        },
    };
    Err(ApiError::new(
        StatusCode::CONFLICT,
        "not-running",
        format!("run `{id}` has already ended ({status})"),
    ))
}
