//! `GET /events`: the host's events as server-sent events, each a
//! CloudEvent in JSON, filterable by type (`?type=`, a prefix such as
//! `q.qflow.step.`) and run (`?run=`). A client that falls behind misses
//! events and is told how many, with an event of type `lagged`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Sse as SseResponse};
use futures::StreamExt;
use serde::Deserialize;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::{ApiError, AppState};

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct Filter {
    /// Only events whose type starts with this.
    #[serde(rename = "type")]
    kind: Option<String>,
    /// Only events of this run.
    run: Option<String>,
}

/// The host's events as server-sent events (CloudEvents, JSON).
#[utoipa::path(get, path = "/api/v1/events", params(Filter),
    responses((status = 200, description = "text/event-stream of CloudEvents")))]
pub(crate) async fn stream(
    State(state): State<Arc<AppState>>,
    filter: Result<Query<Filter>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(filter) = filter.map_err(|e| ApiError::bad_request("bad-query", e.body_text()))?;
    let events = BroadcastStream::new(state.host.subscribe());
    let stream = events
        .filter_map(move |received| {
            let sse = match received {
                Ok(event) => {
                    let wanted = filter
                        .kind
                        .as_ref()
                        .is_none_or(|k| event.data.kind().starts_with(k.as_str()))
                        && filter
                            .run
                            .as_ref()
                            .is_none_or(|r| event.data.run_id() == Some(r.as_str()));
                    if wanted {
                        Sse::default()
                            .event(event.data.kind())
                            .id(event.id.clone())
                            .json_data(&event)
                            .ok()
                    } else {
                        None
                    }
                }
                Err(BroadcastStreamRecvError::Lagged(missed)) => Sse::default()
                    .event("lagged")
                    .json_data(serde_json::json!({ "missed": missed }))
                    .ok(),
            };
            std::future::ready(sse.map(Ok::<_, Infallible>))
        })
        // The stream ends at shutdown, so that it holds no connection open.
        .take_until(state.shutdown.clone().cancelled_owned());
    Ok(SseResponse::new(stream).keep_alive(KeepAlive::default()))
}

/// `GET /events/history?type=&limit=`.
#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(crate) struct HistoryQuery {
    /// Only events whose type starts with this, such as `q.qflow.plugin.`.
    #[serde(rename = "type")]
    kind: Option<String>,
    /// At most this many, the newest (100; at most 1000).
    limit: Option<u32>,
}

/// The host's own stored events (plugins, caches, the optimizer; a run's
/// are on `GET /runs/{id}/events`), oldest first.
#[utoipa::path(get, path = "/api/v1/events/history", params(HistoryQuery),
    responses((status = 200, body = [Object]), (status = 400, body = crate::error::Body<'static>)))]
pub(crate) async fn history(
    State(state): State<Arc<AppState>>,
    query: Result<Query<HistoryQuery>, QueryRejection>,
) -> Result<axum::Json<Vec<qflow::Event>>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad-query", e.body_text()))?;
    let prefix = query.kind.unwrap_or_default();
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let events = state.store().host_events(&prefix, limit).await.map_err(ApiError::store)?;
    Ok(axum::Json(events))
}
