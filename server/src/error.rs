//! API errors: JSON `{code, message, details}` with the right status. A
//! user's mistake is a 4xx that says what to fix; only a fault of the
//! server itself is a 5xx.

use axum::Json;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::Value;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<Value>,
}

/// The body of an error answer: a stable code, a message for people, and
/// details (such as every problem of a flow).
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Body<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    details: Option<&'a Value>,
}

impl ApiError {
    /// An error with `status`, a stable machine-readable `code`, and a
    /// message for people.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into(), details: None }
    }

    /// The same error with details (such as every problem of a flow).
    pub fn details(mut self, details: Value) -> ApiError {
        self.details = Some(details);
        self
    }

    /// 404: no such thing.
    pub fn not_found(what: &str, id: &str) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not-found", format!("no {what} `{id}`"))
    }

    /// 400: the request is malformed.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 503: the run store failed (the database went away): the server's
    /// trouble, not the request's, and worth trying again.
    pub fn store(error: qflow::model::StoreError) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store-unavailable", error.to_string())
    }

    /// The status it answers with.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

impl From<BytesRejection> for ApiError {
    /// A body that could not be read: too large (413), or cut short (400).
    fn from(rejection: BytesRejection) -> ApiError {
        let status = rejection.status();
        let code =
            if status == StatusCode::PAYLOAD_TOO_LARGE { "body-too-large" } else { "bad-body" };
        ApiError::new(status, code, rejection.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Body { code: self.code, message: &self.message, details: self.details.as_ref() };
        (self.status, Json(body)).into_response()
    }
}

/// Parses a JSON body into `T`: invalid JSON is a 400 naming the place,
/// JSON of the wrong shape a 422 naming the field.
pub fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return serde_json::from_slice(b"{}").map_err(|e| {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", e.to_string())
        });
    }
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request("bad-json", format!("the body is not JSON: {e}")))?;
    serde_json::from_value(value).map_err(|e| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid-request", e.to_string())
    })
}
