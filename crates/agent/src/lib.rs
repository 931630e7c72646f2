//! The nimbus node agent: registers the node, watches its assignments, converges local reality
//! through the drivers (deciding in [`decide`], executing in [`runtime`]), and reports status.

pub mod config;
mod control;
mod converge;
pub mod credential;
pub mod decide;
pub mod driver;
pub mod fleet;
pub mod http;
pub mod lb_host;
pub mod local;
pub mod logs;
mod netloop;
pub mod runtime;
pub mod server_link;
pub mod tls;
pub mod usage;
pub mod vip;

pub use config::AgentConfig;
pub use runtime::{Agent, AgentHandle};
