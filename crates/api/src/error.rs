//! The API error: a stable machine-readable code, a human message and the offending field.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Stable error codes. Clients match on these; they never change meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The request could not be parsed (malformed JSON, unknown field, bad header).
    BadRequest,
    /// A field failed validation.
    InvalidArgument,
    /// Missing or wrong bearer token.
    Unauthorized,
    /// The connection's client certificate expired after its handshake (a kept-alive
    /// connection): reconnect with a renewed certificate.
    CertificateExpired,
    /// The connection's client certificate was revoked (by its holder's name or its serial).
    CertificateRevoked,
    /// The token is valid but may not do this.
    Forbidden,
    /// The resource does not exist.
    NotFound,
    /// The route exists but not with this HTTP method (the `Allow` header lists those it has).
    MethodNotAllowed,
    /// A resource with this name already exists.
    AlreadyExists,
    /// The resource is in a state that does not allow this operation.
    Conflict,
    /// The `version` given does not match the stored one.
    VersionConflict,
    /// No node can run this request; the message says why for each node.
    Unschedulable,
    /// The request body is over the limit.
    PayloadTooLarge,
    /// The server cannot serve right now (no leader, shutting down).
    Unavailable,
    /// A bug or an unexpected failure on the server side.
    Internal,
}

impl ErrorCode {
    /// The HTTP status this code is served with.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BadRequest => 400,
            Self::Unauthorized | Self::CertificateExpired | Self::CertificateRevoked => 401,
            Self::Forbidden => 403,
            Self::NotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::AlreadyExists | Self::Conflict | Self::VersionConflict | Self::Unschedulable => {
                409
            }
            Self::PayloadTooLarge => 413,
            Self::InvalidArgument => 422,
            Self::Unavailable => 503,
            Self::Internal => 500,
        }
    }

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::InvalidArgument => "invalid_argument",
            Self::Unauthorized => "unauthorized",
            Self::CertificateExpired => "certificate_expired",
            Self::CertificateRevoked => "certificate_revoked",
            Self::Forbidden => "forbidden",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::AlreadyExists => "already_exists",
            Self::Conflict => "conflict",
            Self::VersionConflict => "version_conflict",
            Self::Unschedulable => "unschedulable",
            Self::PayloadTooLarge => "payload_too_large",
            Self::Unavailable => "unavailable",
            Self::Internal => "internal",
        }
    }
}

/// An error as returned by the API: `{"error": {"code": ..., "message": ..., "field": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    /// Stable code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
    /// The request field at fault, as a JSON path (`memory`, `labels.app`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// The envelope around [`ApiError`] on the wire.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ApiError,
}

impl ApiError {
    /// A new error with no field.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            field: None,
        }
    }
    /// A validation error on `field`.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::InvalidArgument,
            message: message.into(),
            field: Some(field.into()),
        }
    }
    /// `kind NAME not found`.
    pub fn not_found(kind: &str, name: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{kind} {name:?} not found"))
    }
    /// `kind NAME already exists`.
    pub fn already_exists(kind: &str, name: &str) -> Self {
        Self {
            code: ErrorCode::AlreadyExists,
            message: format!("{kind} {name:?} already exists"),
            field: Some("name".into()),
        }
    }
    /// A state conflict.
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Conflict, message)
    }
    /// An internal error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    /// Sets the field.
    #[must_use]
    pub fn with_field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
}
