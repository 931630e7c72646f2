//! HTTP mapping of [`ApiError`], and a JSON extractor whose rejections are API errors.

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
