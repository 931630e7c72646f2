//! The nimbus resource model: the serde types shared by the REST API, the CLI, the replicated
//! state and the agents, their validation, and the error body every API error uses.

pub mod error;
pub mod resources;
pub mod requests;
pub mod validate;
pub mod agent;

pub use error::{ApiError, ErrorBody, ErrorCode};
pub use resources::*;
pub use requests::*;
