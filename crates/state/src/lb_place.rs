//! Load-balancer placement: which nodes serve an LB.
//!
//! Without `nodes` or `replicas` in its spec an LB is served by every ready node (like
//! kube-proxy). Otherwise [`place`] chooses, deterministically, among the ready, uncordoned
//! nodes (restricted to `nodes` when given): the VIP nodes first (so the VIP can only be held
//! by a serving node), then the nodes already serving it (a placement only moves when it has
//! to), then by a rendezvous hash of the LB and node names (so LBs spread over the nodes).
//! The choice is stored in `status.nodes` and recomputed after every applied command
//! ([`StateMachine::place_lbs`]); when it changes, the nodes leaving and joining get a new
//! assignment revision.

use std::collections::BTreeSet;

use nimbus_api::lb::LoadBalancerSpec;
use nimbus_api::NodeState;

use crate::machine::StateMachine;

/// FNV-1a of `lb` and `node` (stable across builds and replicas).
fn score(lb: &str, node: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in lb.bytes().chain([0]).chain(node.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The nodes that serve LB `lb` (its `project/name`), sorted (pure).
///
/// `ready`: the ready nodes; `uncordoned`: those of them not cordoned; `current`: the nodes
/// serving it now. Without `spec.nodes` and `spec.replicas` every ready node serves it.
pub fn place(
    lb: &str,
    spec: &LoadBalancerSpec,
    ready: &BTreeSet<String>,
    uncordoned: &BTreeSet<String>,
    current: &[String],
) -> Vec<String> {
    if spec.nodes.is_empty() && spec.replicas.is_none() {
        return ready.iter().cloned().collect();
    }
    let mut candidates: Vec<&String> = uncordoned
        .iter()
        .filter(|n| spec.nodes.is_empty() || spec.nodes.contains(n))
        .collect();
    let Some(replicas) = spec.replicas else {
        return candidates.into_iter().cloned().collect();
    };
    candidates.sort_by_key(|n| {
        (
            !spec.vip_nodes.contains(n),
            !current.contains(n),
            std::cmp::Reverse(score(lb, n)),
            n.as_str(),
        )
    });
    let mut out: Vec<String> = candidates
        .into_iter()
        .take(replicas as usize)
        .cloned()
        .collect();
    out.sort();
    out
}

impl StateMachine {
    /// Re-places every LB after a command that changed nodes or load balancers (placement
    /// depends on nothing else); the settle step wakes the nodes whose set of LBs changed.
    pub(crate) fn place_lbs(&mut self) {
        if self.loadbalancers.is_empty() || !(self.nodes.changed() || self.loadbalancers.changed())
        {
            return;
        }
        let ready: BTreeSet<String> = self
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Ready)
            .map(|n| n.meta.name.clone())
            .collect();
        let uncordoned: BTreeSet<String> = self
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Ready && !n.cordoned)
            .map(|n| n.meta.name.clone())
            .collect();
        let moved: Vec<(String, Vec<String>)> = self
            .loadbalancers
            .iter()
            .filter_map(|(key, lb)| {
                let next = place(key, &lb.spec, &ready, &uncordoned, &lb.status.nodes);
                (next != lb.status.nodes).then(|| (key.clone(), next))
            })
            .collect();
        for (key, next) in moved {
            if let Some(lb) = self.loadbalancers.get_mut(&key) {
                lb.status.nodes = next;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_api::lb::LbBackends;

    fn spec(nodes: &[&str], replicas: Option<u32>, vip_nodes: &[&str]) -> LoadBalancerSpec {
        LoadBalancerSpec {
            vip_nodes: vip_nodes.iter().map(|s| (*s).to_string()).collect(),
            nodes: nodes.iter().map(|s| (*s).to_string()).collect(),
            replicas,
            ..crate::lb_tests::spec(80, LbBackends::default())
        }
    }

    fn set(v: &[&str]) -> BTreeSet<String> {
        v.iter().map(|s| (*s).to_string()).collect()
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_string()).collect()
    }

    #[test]
    fn unset_means_every_ready_node_even_cordoned() {
        let ready = set(&["a", "b", "c"]);
        let p = place(
            "p/lb",
            &spec(&[], None, &[]),
            &ready,
            &set(&["a", "b"]),
            &[],
        );
        assert_eq!(p, ["a", "b", "c"]);
    }

    #[test]
    fn explicit_nodes_keep_only_ready_uncordoned_ones() {
        let ready = set(&["a", "b", "c"]);
        let unc = set(&["a", "c"]);
        let p = place(
            "p/lb",
            &spec(&["b", "c", "d"], None, &[]),
            &ready,
            &unc,
            &[],
        );
        assert_eq!(p, ["c"]);
    }

    #[test]
    fn replicas_are_deterministic_sticky_and_replaced_when_a_node_goes() {
        let all = set(&["a", "b", "c", "d", "e"]);
        let s = spec(&[], Some(2), &[]);
        let p = place("p/lb", &s, &all, &all, &[]);
        assert_eq!(p.len(), 2);
        assert_eq!(place("p/lb", &s, &all, &all, &[]), p, "deterministic");
        // Different LBs spread: over 20 LBs, more than 2 distinct nodes are used.
        let used: BTreeSet<String> = (0..20)
            .flat_map(|i| place(&format!("p/lb{i}"), &s, &all, &all, &[]))
            .collect();
        assert!(used.len() > 2, "{used:?}");
        // Sticky: the current nodes stay even if the hash prefers others.
        let cur = strs(&["c", "e"]);
        assert_eq!(place("p/lb", &s, &all, &all, &cur), cur);
        // One of them goes down: only it is replaced.
        let mut fewer = all.clone();
        fewer.remove("c");
        let p2 = place("p/lb", &s, &fewer, &fewer, &cur);
        assert_eq!(p2.len(), 2);
        assert!(p2.contains(&"e".to_string()) && !p2.contains(&"c".to_string()));
        // Not enough nodes: as many as there are.
        let one = set(&["b"]);
        assert_eq!(place("p/lb", &s, &one, &one, &cur), ["b"]);
        assert!(place("p/lb", &s, &set(&[]), &set(&[]), &cur).is_empty());
    }

    #[test]
    fn vip_nodes_are_chosen_first() {
        let all = set(&["a", "b", "c", "d"]);
        let s = spec(&[], Some(2), &["d"]);
        for cur in [strs(&[]), strs(&["a", "b"])] {
            let p = place("p/lb", &s, &all, &all, &cur);
            assert!(p.contains(&"d".to_string()), "{p:?}");
            assert_eq!(p.len(), 2);
        }
        let s = spec(&["a", "b", "c"], Some(1), &["b"]);
        assert_eq!(place("p/lb", &s, &all, &all, &strs(&["a"])), ["b"]);
    }
}
