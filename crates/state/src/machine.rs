//! The pure state machine: all cluster state, and the deterministic `apply` of commands.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use nimbus_api::{ApiError, ErrorCode, Event, Image, Instance, Node, Project};

use crate::command::{CommandEnvelope, CommandResult, COMMAND_FORMAT_VERSION};

/// All replicated state. Serialized whole as the snapshot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateMachine {
    /// Last applied log index (the state revision).
    pub revision: u64,
    /// Projects by name.
    pub projects: BTreeMap<String, Project>,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Images by name.
    pub images: BTreeMap<String, Image>,
    /// Instances by id.
    pub instances: BTreeMap<String, Instance>,
    /// Recent events (bounded).
    pub events: std::collections::VecDeque<Event>,
    /// Next event sequence number.
    pub next_event_seq: u64,
}

impl StateMachine {
    /// Applies one command at log index `index`. Pure: the result depends only on the state,
    /// the index and the envelope.
    pub fn apply(&mut self, index: u64, env: &CommandEnvelope) -> CommandResult {
        self.revision = index;
        if env.format > COMMAND_FORMAT_VERSION {
            return Err(ApiError::new(
                ErrorCode::Internal,
                format!("log entry uses command format {} but this server understands up to {}; upgrade this server", env.format, COMMAND_FORMAT_VERSION),
            ));
        }
        let _ = env;
        todo!("filled in by the state machine commit")
    }
}
