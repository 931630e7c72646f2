//! The HTTP face of [`ApiError`], shared by the server's API and the agent's: an error as a
//! response, JSON and query extractors whose rejections are API errors, and the layer that
//! turns every other error response (axum's rejections of a path or query string, its 405 for
//! a wrong method) into the same JSON error body.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use nimbus_api::{ApiError, ErrorBody, ErrorCode};
use serde::de::DeserializeOwned;

/// An API error as an HTTP response.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(code = self.0.code.as_str(), "{}", self.0.message);
        }
        (status, Json(ErrorBody { error: self.0 })).into_response()
    }
}

/// Handler result.
pub type HttpResult<T> = Result<T, HttpError>;

/// `Json<T>` whose rejections become `bad_request` / `payload_too_large` API errors naming the
/// offending field where serde says which.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = HttpError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(rej) => Err(HttpError(json_rejection(&rej))),
        }
    }
}

fn json_rejection(rej: &JsonRejection) -> ApiError {
    if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError::new(ErrorCode::PayloadTooLarge, "request body is too large");
    }
    let text = rej.body_text();
    let field = text
        .split("unknown field `")
        .nth(1)
        .and_then(|s| s.split('`').next())
        .map(String::from)
        .or_else(|| {
            text.split("missing field `")
                .nth(1)
                .and_then(|s| s.split('`').next())
                .map(String::from)
        })
        .or_else(|| {
            // "Failed to deserialize the JSON body into the target type: cpus: invalid type..."
            text.split("target type: ")
                .nth(1)
                .and_then(|s| s.split(':').next())
                .map(str::trim)
                .filter(|f| !f.contains(' '))
                .map(String::from)
        });
    ApiError {
        code: ErrorCode::BadRequest,
        message: text,
        field,
    }
}

/// `Query<T>` whose rejections are `bad_request` API errors (JSON, like every error).
pub struct ApiQuery<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(rej) => {
                let text = rej.body_text();
                // "Failed to deserialize query string: limit: invalid digit found in string"
                let field = text
                    .split("query string: ")
                    .nth(1)
                    .and_then(|s| s.split(':').next())
                    .map(str::trim)
                    .filter(|f| !f.contains(' '))
                    .map(String::from);
                Err(HttpError(ApiError {
                    code: ErrorCode::BadRequest,
                    message: text,
                    field,
                }))
            }
        }
    }
}

/// The JSON error for a non-JSON error response of `status` whose body said `text`.
pub fn error_for(status: StatusCode, text: &str) -> ApiError {
    let code = match status.as_u16() {
        401 => ErrorCode::Unauthorized,
        403 => ErrorCode::Forbidden,
        404 => ErrorCode::NotFound,
        405 => ErrorCode::MethodNotAllowed,
        413 => ErrorCode::PayloadTooLarge,
        503 => ErrorCode::Unavailable,
        500..=599 => ErrorCode::Internal,
        _ => ErrorCode::BadRequest,
    };
    let text = text.trim();
    let message = if text.is_empty() {
        match code {
            ErrorCode::MethodNotAllowed => "method not allowed on this route".to_string(),
            _ => status.canonical_reason().unwrap_or("error").to_lowercase(),
        }
    } else {
        text.to_string()
    };
    // "Failed to deserialize query string: limit: invalid digit found in string"
    let field = text
        .split("query string: ")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .map(str::trim)
        .filter(|f| !f.is_empty() && !f.contains(' '))
        .map(String::from);
    ApiError {
        code,
        message,
        field,
    }
}

/// Largest error body the JSON layer reads back to rewrite it.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Middleware: an error response (4xx/5xx) that is not JSON already, such as axum's plain-text
/// rejection of a bad query string or path or its empty 405, is rewritten into the JSON error
/// body with the same status (headers such as `Allow` are kept).
pub async fn json_errors(req: Request, next: axum::middleware::Next) -> Response {
    let res = next.run(req).await;
    let status = res.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return res;
    }
    let is_json = res
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return res;
    }
    let (mut parts, body) = res.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_ERROR_BODY)
        .await
        .unwrap_or_default();
    let error = error_for(status, &String::from_utf8_lossy(&bytes));
    parts.headers.remove(axum::http::header::CONTENT_TYPE);
    parts.headers.remove(axum::http::header::CONTENT_LENGTH);
    let mut json = Json(ErrorBody { error }).into_response();
    *json.status_mut() = status;
    for (k, v) in &parts.headers {
        json.headers_mut().insert(k.clone(), v.clone());
    }
    json
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_errors_get_stable_codes_and_fields() {
        let e = error_for(StatusCode::METHOD_NOT_ALLOWED, "");
        assert_eq!(e.code, ErrorCode::MethodNotAllowed);
        assert!(!e.message.is_empty());
        let e = error_for(
            StatusCode::BAD_REQUEST,
            "Failed to deserialize query string: limit: invalid digit found in string",
        );
        assert_eq!(
            (e.code, e.field.as_deref()),
            (ErrorCode::BadRequest, Some("limit"))
        );
        let e = error_for(
            StatusCode::BAD_REQUEST,
            "Invalid URL: Cannot parse `x` to a `u64`",
        );
        assert_eq!((e.code, e.field), (ErrorCode::BadRequest, None));
        assert_eq!(
            error_for(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Expected request with `Content-Type: application/json`"
            )
            .code,
            ErrorCode::BadRequest
        );
        assert_eq!(
            error_for(StatusCode::NOT_FOUND, "").code,
            ErrorCode::NotFound
        );
        assert_eq!(
            error_for(StatusCode::BAD_GATEWAY, "x").code,
            ErrorCode::Internal
        );
    }
}
