//! The dashboard: a small static app (`server/dashboard/`) compiled into
//! the binary and served at `/`. It holds no data of its own — every
//! figure comes from the API — so its files are served without a token;
//! the API calls it makes carry one when the server wants it.

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;

const INDEX: &str = include_str!("../dashboard/index.html");
const SCRIPT: &str = include_str!("../dashboard/app.js");
const STYLE: &str = include_str!("../dashboard/app.css");

/// The paths the dashboard's files are served at: what needs no token.
pub(crate) fn is_dashboard(path: &str) -> bool {
    path == "/" || path.starts_with("/dashboard/")
}

/// The dashboard's routes.
pub(crate) fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/dashboard/app.js", get(script))
        .route("/dashboard/app.css", get(style))
}

/// The dashboard.
#[utoipa::path(get, path = "/", responses((status = 200, description = "the dashboard (HTML)")))]
pub(crate) async fn index() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8"), cache()], INDEX)
}

async fn script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8"), cache()], SCRIPT)
}

async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8"), cache()], STYLE)
}

/// Served from the binary, so a new binary is a new dashboard: the browser
/// checks again every time.
fn cache() -> (header::HeaderName, &'static str) {
    (header::CACHE_CONTROL, "no-cache")
}
