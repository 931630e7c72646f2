//! HTTP mapping of [`nimbus_api::ApiError`]: shared with the agent's API (`nimbus_http`).

pub use nimbus_http::*;
