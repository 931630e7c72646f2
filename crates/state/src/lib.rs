//! Replicated state: typed [`Command`]s, the pure [`StateMachine`] they apply to, and the
//! openraft + redb runtime that orders them through a Raft log.

pub mod command;
pub mod drain;
pub mod engine;
pub mod index;
pub mod lb_place;
mod loadbalancers;
pub mod machine;
pub mod netmap;
pub mod network;
mod nodes;
pub mod pki;
pub mod placement;
pub mod preemption;
pub mod raft;
mod scheduling;
pub mod secrets;
pub mod tracked;
pub mod utilization;
pub mod vip;
mod vm_probe;
pub mod volumes;
pub mod vpc;

pub use command::{
    Command, CommandEnvelope, CommandOutput, CommandResult, InstanceAction, NodeRegistrar,
    COMMAND_FORMAT_VERSION,
};
pub use machine::{StateData, StateMachine};

#[cfg(test)]
mod index_tests;
#[cfg(test)]
mod lb_tests;
#[cfg(test)]
mod machine_tests;
#[cfg(test)]
mod nodes_tests;
#[cfg(test)]
mod preemption_tests;
#[cfg(test)]
mod utilization_tests;
#[cfg(test)]
mod vm_probe_tests;
#[cfg(test)]
mod volumes_tests;
