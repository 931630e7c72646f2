//! Node liveness and telemetry, held in the leader's memory and never written to the Raft log.
//!
//! Agents heartbeat every [`HEARTBEAT_INTERVAL`]; a heartbeat renews the node's lease in this
//! store (a map update, no consensus), carries the node's measured utilisation, and the
//! interface counters of its instances arrive the same way. Only *transitions* are committed:
//! a node whose lease ran out is marked down (`Command::MarkNodeDown`), a down node that
//! heartbeats again is marked ready (`Command::MarkNodeReady`), and at most every
//! [`UTILIZATION_SNAPSHOT_EVERY`] the leader commits one `Command::UtilizationSnapshot` with the
//! measurements that changed, which is all placement reads. A follower that receives a
//! heartbeat forwards it to the leader.
//!
//! Leases: a node is down once the leader has heard nothing from it for [`LEASE_TTL`]. After a
//! leader change or a server restart every node gets a full TTL counted from the moment this
//! server became leader. Two guards keep a slow control plane from failing healthy nodes: a
//! liveness pass that ran late (the server itself stalled) restarts every lease, and a pass in
//! which more than half of the ready nodes (and more than [`MASS_EXPIRY_MIN`]) would expire at
//! once marks none down and says why: that is the server or the network failing, not the
//! nodes (Kubernetes' node lifecycle controller stops evictions in the same situation).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use nimbus_api::lb::{LbBackendHealth, LoadBalancer};
use nimbus_api::{InterfaceCounters, Node, NodeState, NodeUtilization};
use tokio::time::Instant;

/// How often agents heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(2);
/// How long a lease lasts without a heartbeat (five missed heartbeats).
pub const LEASE_TTL: Duration = Duration::from_secs(10);
/// Least time between two committed utilisation snapshots.
pub const UTILIZATION_SNAPSHOT_EVERY: Duration = Duration::from_secs(30);
/// A measurement that moved less than this (per mille, in every dimension) is not re-committed.
pub const UTILIZATION_STEP_PERMILLE: u32 = 20;
/// Mass expiry needs more than this many nodes (small clusters may lose all their nodes).
pub const MASS_EXPIRY_MIN: usize = 3;
/// A liveness pass later than this after the previous one means the server stalled.
pub const STALL: Duration = Duration::from_secs(2);

/// What the leader heard from one node, as servers exchange it and the API shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TelemetryView {
    /// Last heartbeat, RFC 3339 (shown as the node's `last_heartbeat`).
    pub seen_at: String,
    /// Last measurement, if the node measures.
    #[serde(default)]
    pub utilization: Option<NodeUtilization>,
    /// Instance interface counters, as last reported.
    #[serde(default)]
    pub interfaces: Vec<InterfaceCounters>,
    /// When the counters were reported, RFC 3339.
    #[serde(default)]
    pub counters_at: Option<String>,
    /// Backend health of the load balancers the node serves, by LB id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub loadbalancers: BTreeMap<String, Vec<LbBackendHealth>>,
}

/// One node's sign of life, with whatever telemetry it carried.
#[derive(Debug, Clone, PartialEq, Default, serde::Serialize, serde::Deserialize)]
pub struct Beat {
    /// Node name.
    pub node: String,
    /// Its measurement, if it sent one.
    #[serde(default)]
    pub utilization: Option<NodeUtilization>,
    /// Its instances' interface counters, if it sent them.
    #[serde(default)]
    pub interfaces: Option<Vec<InterfaceCounters>>,
    /// Backend health of the LBs it serves (by LB id), if it sent it.
    #[serde(default)]
    pub loadbalancers: Option<BTreeMap<String, Vec<LbBackendHealth>>>,
    /// The assignment revision it has applied (it polled for what comes after it).
    #[serde(default)]
    pub acked: Option<u64>,
}

/// One node's entry: the lease (monotonic) and the telemetry.
#[derive(Debug, Clone)]
struct NodeTelemetry {
    seen: Instant,
    /// The highest assignment revision the node said it applied.
    acked: u64,
    view: TelemetryView,
}

/// The telemetry store.
#[derive(Debug, Default)]
pub struct Telemetry {
    nodes: Mutex<HashMap<String, NodeTelemetry>>,
}

impl Telemetry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, NodeTelemetry>> {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Renews a node's lease; what the beat carries replaces the previous values.
    pub fn beat(&self, b: &Beat, now: Instant, at: &str) {
        let mut nodes = self.lock();
        let t = nodes
            .entry(b.node.clone())
            .or_insert_with(|| NodeTelemetry {
                seen: now,
                acked: 0,
                view: TelemetryView::default(),
            });
        t.seen = now;
        t.acked = t.acked.max(b.acked.unwrap_or(0));
        at.clone_into(&mut t.view.seen_at);
        if b.utilization.is_some() {
            t.view.utilization = b.utilization;
        }
        if let Some(i) = &b.interfaces {
            t.view.interfaces.clone_from(i);
            t.view.counters_at = Some(at.to_string());
        }
        if let Some(l) = &b.loadbalancers {
            t.view.loadbalancers.clone_from(l);
        }
    }

    /// When each node was last heard from.
    pub fn last_seen(&self) -> HashMap<String, Instant> {
        self.lock()
            .iter()
            .map(|(n, t)| (n.clone(), t.seen))
            .collect()
    }

    /// The assignment revision each node has applied.
    pub fn acked(&self) -> HashMap<String, u64> {
        self.lock()
            .iter()
            .map(|(n, t)| (n.clone(), t.acked))
            .collect()
    }

    /// The current measurements.
    pub fn utilizations(&self) -> BTreeMap<String, NodeUtilization> {
        self.lock()
            .iter()
            .filter_map(|(n, t)| Some((n.clone(), t.view.utilization?)))
            .collect()
    }

    /// Forgets everything (this server stopped being the leader: its leases mean nothing).
    pub fn clear(&self) {
        self.lock().clear();
    }

    /// Forgets nodes that are no longer in the state.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.lock().retain(|n, _| keep(n));
    }

    /// The views of `names` (all nodes when `None`).
    pub fn views(&self, names: Option<&[String]>) -> HashMap<String, TelemetryView> {
        let nodes = self.lock();
        match names {
            Some(names) => names
                .iter()
                .filter_map(|n| Some((n.clone(), nodes.get(n)?.view.clone())))
                .collect(),
            None => nodes
                .iter()
                .map(|(n, t)| (n.clone(), t.view.clone()))
                .collect(),
        }
    }
}

/// Shows telemetry in a node resource (`last_heartbeat`, counters, the live measurement).
pub fn apply(node: &mut Node, t: &TelemetryView) {
    if !t.seen_at.is_empty() {
        node.last_heartbeat.clone_from(&t.seen_at);
    }
    if t.counters_at.is_some() {
        node.interfaces.clone_from(&t.interfaces);
        node.counters_at.clone_from(&t.counters_at);
    }
    if t.utilization.is_some() {
        node.utilization = t.utilization;
    }
}

/// Shows the backend health the LB's serving nodes reported in its status.
pub fn apply_lb<S: std::hash::BuildHasher>(
    lb: &mut LoadBalancer,
    views: &HashMap<String, TelemetryView, S>,
) {
    let mut backends: Vec<LbBackendHealth> = lb
        .status
        .nodes
        .iter()
        .filter_map(|n| Some((n, views.get(n)?.loadbalancers.get(&lb.meta.id)?)))
        .flat_map(|(n, r)| {
            r.iter().map(move |b| LbBackendHealth {
                node: n.clone(),
                ..b.clone()
            })
        })
        .collect();
    backends.sort_by(|a, b| {
        (a.instance.as_str(), a.node.as_str()).cmp(&(b.instance.as_str(), b.node.as_str()))
    });
    lb.status.backends = backends;
}

/// The liveness controller's memory between passes (pure; see [`Liveness::pass`]).
#[derive(Debug, Clone, Copy)]
pub struct Liveness {
    /// Leases are counted from no earlier than this: when this server became leader, or when
    /// it last recovered from a stall.
    epoch: Instant,
    /// When the previous pass ran.
    last_pass: Instant,
}

/// The outcome of one liveness pass.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    /// Nodes to mark down.
    pub down: Vec<String>,
    /// Why nothing was marked down although leases ran out.
    pub suppressed: Option<String>,
}

impl Liveness {
    /// Starts counting leases at `now` (leadership gained).
    pub fn new(now: Instant) -> Self {
        Self {
            epoch: now,
            last_pass: now,
        }
    }

    /// Decides which ready nodes lost their lease. `nodes`: every node with its committed
    /// state; `seen`: when each was last heard from.
    pub fn pass(
        &mut self,
        now: Instant,
        nodes: &[(String, NodeState)],
        seen: &HashMap<String, Instant>,
        ttl: Duration,
    ) -> Verdict {
        if now.saturating_duration_since(self.last_pass) > STALL {
            // The server did not run its own passes in time: heartbeats may have been
            // waiting just as long. Everyone gets a fresh lease.
            self.epoch = now;
        }
        self.last_pass = now;
        let ready: Vec<&String> = nodes
            .iter()
            .filter(|(_, s)| *s == NodeState::Ready)
            .map(|(n, _)| n)
            .collect();
        let down: Vec<String> = ready
            .iter()
            .filter(|n| {
                let last = seen.get(n.as_str()).copied().unwrap_or(self.epoch);
                now.saturating_duration_since(last.max(self.epoch)) > ttl
            })
            .map(|n| (*n).clone())
            .collect();
        if down.len() > MASS_EXPIRY_MIN && down.len() * 2 > ready.len() {
            return Verdict {
                suppressed: Some(format!(
                    "{} of {} ready nodes missed their heartbeats at once; suspecting the control plane or the network, not the nodes, so none is marked down",
                    down.len(),
                    ready.len()
                )),
                down: Vec::new(),
            };
        }
        Verdict {
            down,
            suppressed: None,
        }
    }
}

/// The measurements worth committing: nodes without a committed measurement, or whose
/// measurement moved by at least [`UTILIZATION_STEP_PERMILLE`] in some dimension.
pub fn changed_utilizations(
    live: &BTreeMap<String, NodeUtilization>,
    committed: &impl Fn(&str) -> Option<Option<NodeUtilization>>,
) -> BTreeMap<String, NodeUtilization> {
    let moved = |a: u32, b: u32| a.abs_diff(b) >= UTILIZATION_STEP_PERMILLE;
    live.iter()
        .filter(|(n, u)| match committed(n) {
            // Not a node (any more).
            None => false,
            Some(None) => true,
            Some(Some(c)) => {
                moved(c.cpu_permille, u.cpu_permille)
                    || moved(c.memory_permille, u.memory_permille)
                    || moved(c.network_permille, u.network_permille)
                    || c.network_mbps != u.network_mbps
            }
        })
        .map(|(n, u)| (n.clone(), *u))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nodes(n: usize) -> Vec<(String, NodeState)> {
        (0..n)
            .map(|i| (format!("n{i}"), NodeState::Ready))
            .collect()
    }

    #[test]
    fn a_silent_node_is_down_after_the_ttl_counted_from_leadership() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut l = Liveness::new(t0);
        let all = nodes(5);
        let mut seen: HashMap<String, Instant> = all.iter().map(|(n, _)| (n.clone(), t0)).collect();
        // Passes every 500 ms; everyone but n0 keeps heartbeating.
        let mut at = t0;
        let mut verdict = Verdict::default();
        while at < t0 + Duration::from_secs(11) {
            at += Duration::from_millis(500);
            for (n, _) in all.iter().skip(1) {
                seen.insert(n.clone(), at);
            }
            verdict = l.pass(at, &all, &seen, ttl);
            if !verdict.down.is_empty() {
                break;
            }
        }
        assert_eq!(verdict.down, vec!["n0".to_string()]);
        assert!(at > t0 + ttl, "not before the TTL");
    }

    #[test]
    fn a_new_leader_gives_every_node_a_full_ttl() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        // Heard from long before this server led, and never.
        let mut seen = HashMap::new();
        seen.insert("n0".to_string(), t0);
        let lead = t0 + Duration::from_secs(60);
        let mut l = Liveness::new(lead);
        let all = nodes(2);
        let mut at = lead;
        while at < lead + Duration::from_millis(10_500) {
            at += Duration::from_millis(500);
            let v = l.pass(at, &all, &seen, ttl);
            if at <= lead + ttl {
                assert!(v.down.is_empty(), "{at:?}");
            } else {
                assert_eq!(v.down, vec!["n0".to_string(), "n1".to_string()]);
            }
        }
    }

    #[test]
    fn a_stalled_server_restarts_every_lease() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut l = Liveness::new(t0);
        let all = nodes(1);
        let seen: HashMap<String, Instant> = [("n0".to_string(), t0)].into();
        // The next pass runs 30 s late: the node is not blamed for it.
        let v = l.pass(t0 + Duration::from_secs(30), &all, &seen, ttl);
        assert!(v.down.is_empty());
        let v = l.pass(t0 + Duration::from_millis(30_400), &all, &seen, ttl);
        assert!(v.down.is_empty());
    }

    #[test]
    fn mass_expiry_marks_nobody_down() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(10);
        let mut l = Liveness::new(t0);
        let all = nodes(10);
        let mut seen: HashMap<String, Instant> = all.iter().map(|(n, _)| (n.clone(), t0)).collect();
        let mut at = t0;
        let mut last = Verdict::default();
        for _ in 0..24 {
            at += Duration::from_millis(500);
            // Only n0..n3 keep heartbeating: 6 of 10 go silent together.
            for (n, _) in all.iter().take(4) {
                seen.insert(n.clone(), at);
            }
            last = l.pass(at, &all, &seen, ttl);
        }
        assert!(last.down.is_empty());
        assert!(last.suppressed.unwrap().contains("6 of 10"));
        // Three nodes of a small cluster can still all go down.
        let mut l = Liveness::new(t0);
        let small = nodes(3);
        let seen = HashMap::new();
        let v = l.pass(t0 + Duration::from_millis(500), &small, &seen, ttl);
        assert!(v.down.is_empty());
        let mut at = t0 + Duration::from_millis(500);
        let mut v = Verdict::default();
        while v.down.is_empty() && at < t0 + Duration::from_secs(12) {
            at += Duration::from_millis(500);
            v = l.pass(at, &small, &seen, ttl);
        }
        assert_eq!(v.down.len(), 3);
    }

    #[test]
    fn down_nodes_are_not_marked_again() {
        let t0 = Instant::now();
        let mut l = Liveness::new(t0);
        let all = vec![("n0".to_string(), NodeState::Down)];
        let v = l.pass(
            t0 + Duration::from_secs(1),
            &all,
            &HashMap::new(),
            Duration::ZERO,
        );
        assert!(v.down.is_empty());
    }

    #[test]
    fn only_moved_measurements_are_committed() {
        let u = |c| NodeUtilization {
            cpu_permille: c,
            ..NodeUtilization::default()
        };
        let live: BTreeMap<String, NodeUtilization> = [
            ("same".to_string(), u(500)),
            ("moved".to_string(), u(530)),
            ("new".to_string(), u(10)),
            ("gone".to_string(), u(10)),
        ]
        .into();
        let committed = |n: &str| match n {
            "same" => Some(Some(u(510))),
            "moved" => Some(Some(u(500))),
            "new" => Some(None),
            _ => None,
        };
        let c = changed_utilizations(&live, &committed);
        assert_eq!(c.keys().collect::<Vec<_>>(), ["moved", "new"]);
    }
}
