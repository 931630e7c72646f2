//! The nimbus resource model: the serde types shared by the REST API, the CLI, the replicated
//! state and the agents, their validation, and the error body every API error uses.

pub mod agent;
pub mod cidr;
pub mod error;
pub mod lb;
pub mod lb_place;
pub mod lb_tls;
pub mod netmap_delta;
pub mod network;
pub mod pki;
pub mod requests;
pub mod resources;
pub mod secret;
pub mod validate;
pub mod volume;

pub use error::{ApiError, ErrorBody, ErrorCode};
pub use network::*;
pub use requests::*;
pub use resources::*;
