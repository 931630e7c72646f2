//! Bearer-token authentication: every route but `/healthz` needs a token. The admin token may
//! do everything; the node token only what agents do (`/v1/nodes/...`, image blobs).

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use nimbus_api::{ApiError, ErrorCode};

use crate::app::AppState;
use crate::error::HttpError;

/// Generates a random 256-bit token (hex).
pub fn generate_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

/// Compares two byte strings in time independent of where they differ.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The middleware.
pub async fn require_token(State(app): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/healthz" || path.starts_with("/raft/") {
        // Raft RPCs check the cluster secret themselves.
        return next.run(req).await;
    }
    let token = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(token) = token else {
        return HttpError(ApiError::new(
            ErrorCode::Unauthorized,
            "missing bearer token (set NIMBUS_TOKEN)",
        ))
        .into_response();
    };
    if constant_time_eq(token.as_bytes(), app.admin_token.as_bytes()) {
        return next.run(req).await;
    }
    if constant_time_eq(token.as_bytes(), app.node_token.as_bytes()) {
        let operator_only = req.method() == axum::http::Method::PATCH || path.ends_with("/drain");
        if (path.starts_with("/v1/nodes") && !operator_only)
            || path.starts_with("/v1/fleet/")
            || path.starts_with("/v1/images/blobs/")
        {
            return next.run(req).await;
        }
        return HttpError(ApiError::new(
            ErrorCode::Forbidden,
            "the node token may only be used by agents",
        ))
        .into_response();
    }
    HttpError(ApiError::new(
        ErrorCode::Unauthorized,
        "invalid bearer token",
    ))
    .into_response()
}
