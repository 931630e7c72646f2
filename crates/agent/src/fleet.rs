//! Hollow fleets: thousands of simulated nodes in one process for scale tests (`nimbus agent
//! --hollow --hollow-count N`, like Kubernetes' kubemark; never the default, and it says so).
//!
//! They share one connection pool and talk through the batched `/v1/fleet/...` routes: one
//! registration request per 1,000 nodes, one heartbeat request for all of them every
//! [`HEARTBEAT_EVERY`], one long-poll for the assignments of every node of the fleet, and one
//! status request per batch of changes. So a fleet of 10,000 nodes costs the control plane a
//! few connections and a few requests per second, as real nodes would cost it a connection
//! each. Nothing runs: a hollow node reports the state it is asked for (running, stopped,
//! deleted) as reached as soon as it sees it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use nimbus_api::agent::{
    Assignment, FleetHeartbeatRequest, FleetRegisterRequest, FleetStatusRequest, InstanceReport,
    RegisterNodeRequest, FLEET_LABEL,
};
use nimbus_api::{DesiredState, InstanceState};

use crate::server_link::{LinkError, ServerLink};

/// How often the fleet heartbeats.
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(2);
/// Nodes per registration request (the API takes 1 MiB bodies).
const REGISTER_CHUNK: usize = 1000;
/// Long-poll wait, seconds.
const WATCH_WAIT: u64 = 30;

/// What a hollow node reports for an assignment: the desired state, reached at once.
pub fn hollow_report(a: &Assignment) -> InstanceReport {
    let (state, pid, deleted) = match a.desired {
        DesiredState::Running => (InstanceState::Running, Some(0), false),
        DesiredState::Stopped => (InstanceState::Stopped, None, false),
        DesiredState::Deleted => (InstanceState::Stopped, None, true),
    };
    InstanceReport {
        id: a.id.clone(),
        generation: a.generation,
        state,
        pid,
        exit_code: None,
        message: String::new(),
        restart_count: 0,
        accelerator: None,
        deleted,
    }
}

/// A fleet of hollow nodes.
pub struct HollowFleet {
    link: ServerLink,
    fleet: String,
    nodes: Vec<RegisterNodeRequest>,
}

impl HollowFleet {
    /// A fleet named `fleet` of `nodes` (their fleet label is added), talking to `link`.
    pub fn new(link: ServerLink, fleet: &str, mut nodes: Vec<RegisterNodeRequest>) -> Self {
        for n in &mut nodes {
            n.labels.insert(FLEET_LABEL.to_string(), fleet.to_string());
        }
        Self {
            link,
            fleet: fleet.to_string(),
            nodes,
        }
    }

    /// Registers every node (retrying until the control plane answers).
    pub async fn register(&self) -> Result<(), LinkError> {
        for chunk in self.nodes.chunks(REGISTER_CHUNK) {
            let req = FleetRegisterRequest {
                nodes: chunk.to_vec(),
            };
            let mut delay = Duration::from_millis(200);
            loop {
                match self.link.register_fleet(&req).await {
                    Ok(r) => {
                        if let Some((node, e)) = r.refused.into_iter().next() {
                            return Err(LinkError::Refused(nimbus_api::ApiError {
                                message: format!("node {node}: {}", e.message),
                                ..e
                            }));
                        }
                        break;
                    }
                    Err(e @ (LinkError::Refused(_) | LinkError::NotNimbus(..))) => return Err(e),
                    Err(e) => {
                        tracing::warn!("registering the hollow fleet, retrying: {e}");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                    }
                }
            }
        }
        Ok(())
    }

    /// Runs the fleet (heartbeats, watch, reports) until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        let beats = tokio::spawn(self.clone().heartbeat_loop());
        self.watch_loop().await;
        beats.abort();
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let req = FleetHeartbeatRequest {
            nodes: self.nodes.iter().map(|n| n.name.clone()).collect(),
        };
        let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
        loop {
            tick.tick().await;
            match self.link.heartbeat_fleet(&req).await {
                Ok(()) => {}
                Err(LinkError::Refused(e)) if e.code == nimbus_api::ErrorCode::NotFound => {
                    tracing::warn!("the control plane forgot hollow nodes; registering again");
                    if let Err(e) = self.register().await {
                        tracing::warn!("re-registering the hollow fleet: {e}");
                    }
                }
                Err(e) => tracing::warn!("hollow fleet heartbeat failed: {e}"),
            }
        }
    }

    async fn watch_loop(&self) {
        let mut since = 0;
        // Node -> instance id -> what was last reported.
        let mut reported: HashMap<String, BTreeMap<String, InstanceReport>> = HashMap::new();
        loop {
            let resp = match self.link.watch_fleet(&self.fleet, since, WATCH_WAIT).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!("watching the hollow fleet's assignments failed: {e}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let mut out = FleetStatusRequest::default();
            for (node, a) in resp.nodes {
                let held = reported.entry(node.clone()).or_default();
                let mut changes = Vec::new();
                for asg in &a.assignments {
                    let r = hollow_report(asg);
                    if held.get(&asg.id) != Some(&r) {
                        changes.push(r);
                    }
                }
                // Instances no longer assigned here are gone.
                held.retain(|id, _| a.assignments.iter().any(|x| &x.id == id));
                if !changes.is_empty() {
                    out.nodes.insert(node, changes);
                }
            }
            if !out.nodes.is_empty() {
                match self.link.report_fleet(&out).await {
                    Ok(()) => {
                        for (node, changes) in out.nodes {
                            let held = reported.entry(node).or_default();
                            for r in changes {
                                if r.deleted {
                                    held.remove(&r.id);
                                } else {
                                    held.insert(r.id.clone(), r);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        // Report again from scratch on the next answer.
                        tracing::warn!("hollow fleet status report failed: {e}");
                        reported.clear();
                        since = 0;
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            since = resp.revision;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hollow_nodes_report_the_desired_state_at_once() {
        let a: Assignment = serde_json::from_value(serde_json::json!({
            "id": "i1", "name": "a", "project": "p", "generation": 3, "desired": "running",
            "restart_nonce": 0,
            "spec": {"type": "container", "image": "busybox", "image_digest": "sha256:a",
                "cpus": 0.1, "memory_bytes": 1, "disk_bytes": 1, "restart": "never",
                "pids_limit": 1, "desired": "running"},
            "image": {"name": "busybox", "digest": "sha256:a", "layers": [],
                "default_command": [], "default_env": [], "working_dir": ""},
            "network": {"bridge": "b", "ip": "10.0.0.2", "prefix_len": 24,
                "gateway": "10.0.0.1", "mac": "0a:00:00:00:00:01"}
        }))
        .unwrap();
        let r = hollow_report(&a);
        assert_eq!(
            (r.state, r.generation, r.deleted),
            (InstanceState::Running, 3, false)
        );
        let mut d = a.clone();
        d.desired = DesiredState::Deleted;
        assert!(hollow_report(&d).deleted);
    }
}
