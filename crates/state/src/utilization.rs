//! Measured utilisation and adaptive score weights inside `apply`.
//!
//! Agents send node CPU, memory and network utilisation with their heartbeats to the leader,
//! which keeps them in memory and commits one `Command::UtilizationSnapshot` with the
//! measurements that changed at most every 30 s (`crates/server/src/telemetry.rs`). Each node
//! keeps the last committed measurement and the scheduler snapshot (`placement::nodes`) uses it
//! as the node's measured load (a node's load per dimension is `max(reserved / limit,
//! measured)`), so `apply` stays deterministic.
//!
//! The adaptive weights of the scheduler (`nimbus_scheduler::AdaptiveWeights`, control law in
//! `crates/scheduler/src/adaptive.rs`) are part of the replicated state, so every server places
//! identically: on a snapshot (or, in logs of older builds, a heartbeat) that carries a
//! measurement, at most once per [`ADAPT_PERIOD_MS`] of log time (the proposer's timestamps,
//! so replay gives the same result), the controller takes one step with the cluster-wide
//! pressure (mean load of the ready, uncordoned nodes). Every placement scores with the
//! weights it holds. A change of the boosted dimensions is recorded as a `WeightsAdapted`
//! event. Changing the policy's base weights or control parameters starts a new controller.

use nimbus_scheduler::{AdaptiveWeights, Cluster, Pressure, Weights};
use serde::{Deserialize, Serialize};

use crate::command::CommandEnvelope;
use crate::StateMachine;

/// Least log time between two steps of the adaptive-weight controller, ms.
pub const ADAPT_PERIOD_MS: i64 = 5_000;

/// The controller and when it last stepped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveState {
    /// The controller.
    pub controller: AdaptiveWeights,
    /// Log time (RFC 3339) of the last step.
    pub updated_at: String,
    /// The pressure it last stepped with.
    pub pressure: Pressure,
}

fn millis(t: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|d| d.timestamp_millis())
}

fn dims(b: [bool; 3]) -> String {
    let names: Vec<&str> = ["cpu", "memory", "network"]
        .iter()
        .zip(b)
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect();
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

impl StateMachine {
    /// The weights placements score with: the adaptive controller's, else the policy's.
    pub fn score_weights(&self) -> Weights {
        let policy = self.policy.scheduler.unwrap_or_default();
        match &self.adaptive {
            Some(a) if a.controller.made_for(policy.weights, policy.adaptive) => {
                a.controller.weights()
            }
            _ => policy.weights,
        }
    }

    /// One step of the adaptive-weight controller if one is due (see the module docs).
    pub(crate) fn adapt_weights(&mut self, env: &CommandEnvelope) {
        let policy = self.policy.scheduler.unwrap_or_default();
        let mut state = match self.adaptive.take() {
            Some(a) if a.controller.made_for(policy.weights, policy.adaptive) => a,
            _ => AdaptiveState {
                controller: AdaptiveWeights::new(policy.weights, policy.adaptive),
                updated_at: String::new(),
                pressure: Pressure::default(),
            },
        };
        let due = match (millis(&env.time), millis(&state.updated_at)) {
            (Some(now), Some(last)) => now < last || now - last >= ADAPT_PERIOD_MS,
            _ => true,
        };
        if !due {
            self.adaptive = Some(state);
            return;
        }
        let nodes = crate::placement::nodes(self, None);
        let pressure = Cluster::new(&nodes, policy).pressure();
        let before = (state.controller.boosted(), state.controller.weights());
        let after = state.controller.update(pressure);
        state.updated_at.clone_from(&env.time);
        state.pressure = pressure;
        let boosted = state.controller.boosted();
        self.adaptive = Some(state);
        if boosted != before.0 {
            let message = format!(
                "pressure cpu {:.2} memory {:.2} network {:.2}; boosted: {} (was {}); weights cpu {:.2} memory {:.2} network {:.2} (were {:.2} / {:.2} / {:.2}), moving towards the target over the next steps",
                pressure.cpu,
                pressure.memory,
                pressure.network,
                dims(boosted),
                dims(before.0),
                after.cpu,
                after.memory,
                after.network,
                before.1.cpu,
                before.1.memory,
                before.1.network,
            );
            self.event(env, "", "scheduler", "weights", "WeightsAdapted", message);
        }
    }
}
