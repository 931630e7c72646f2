//! Floating-VIP leases of load balancers, decided in the replicated state.
//!
//! The agents of the nodes that may hold an LB's VIP ask for its lease every
//! [`VIP_RENEW_MS`](nimbus_api::lb::VIP_RENEW_MS). The holder's request renews it; another
//! node gets it only when the lease expired or its holder is no longer a ready node serving the
//! LB (see [`crate::lb_place`]). Expiry is
//! computed from the command envelope's log time (the proposer's clock), so every replica
//! decides the same. The holder fences itself on its own monotonic clock: it drops the address
//! when it could not renew within the TTL counted from *before* it sent the renewal, which is
//! no later than the log time the lease was extended from (given servers with synchronised
//! clocks).

use nimbus_api::lb::{VipLease, VipLeaseResponse, VIP_LEASE_TTL_MS};
use nimbus_api::{ApiError, NodeState};

use crate::command::{CommandEnvelope, CommandOutput, CommandResult};
use crate::machine::StateMachine;

/// Log time in milliseconds since the epoch.
fn millis(t: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|d| d.timestamp_millis())
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// What a lease request decides, given the lease as it stands (pure).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseDecision {
    /// The asking node holds it already: extend it.
    Renew,
    /// Nobody holds it: grant it.
    Acquire,
    /// Another node held it but the lease expired or that node is down: move it.
    Move {
        /// The previous holder.
        from: String,
    },
    /// Another node holds a live lease.
    Refuse {
        /// The holder.
        holder: String,
        /// Its expiry (RFC 3339).
        until: String,
    },
}

/// Decides a lease request by `node` at log time `now_ms`; `holder_ready` tells whether the
/// current holder is a ready node that still serves the LB.
pub fn decide(
    lease: Option<&VipLease>,
    node: &str,
    now_ms: i64,
    holder_ready: bool,
) -> LeaseDecision {
    let Some((holder, l)) = lease.and_then(|l| Some((l.holder.as_deref()?, l))) else {
        return LeaseDecision::Acquire;
    };
    if holder == node {
        return LeaseDecision::Renew;
    }
    let expired = millis(&l.expires_at).is_none_or(|e| now_ms >= e);
    if expired || !holder_ready {
        LeaseDecision::Move {
            from: holder.to_string(),
        }
    } else {
        LeaseDecision::Refuse {
            holder: holder.to_string(),
            until: l.expires_at.clone(),
        }
    }
}

impl StateMachine {
    /// Whether `node` is ready and serves LB `project/name` (only such a node can hold its VIP).
    fn serves(&self, project: &str, name: &str, node: &str) -> bool {
        self.nodes
            .get(node)
            .is_some_and(|n| n.state == NodeState::Ready)
            && self
                .loadbalancer(project, name)
                .is_some_and(|lb| lb.status.nodes.iter().any(|s| s == node))
    }

    /// Acquire, renew or release the VIP lease of LB `project/name` for `node`.
    pub(crate) fn vip_lease(
        &mut self,
        env: &CommandEnvelope,
        node: &str,
        project: &str,
        name: &str,
        vip: &str,
        release: bool,
    ) -> CommandResult {
        let lb = self
            .loadbalancer(project, name)
            .ok_or_else(|| ApiError::not_found("load balancer", name))?;
        let ready = self.serves(project, name, node);
        if lb.spec.vip.as_deref() != Some(vip) {
            return Err(ApiError::conflict(format!(
                "load balancer {project}/{name} has no VIP {vip} (it changed meanwhile)"
            ))
            .with_field("vip"));
        }
        if !lb.spec.vip_nodes.is_empty() && !lb.spec.vip_nodes.iter().any(|n| n == node) {
            return Err(ApiError::conflict(format!(
                "node {node} is not among the VIP nodes of {project}/{name}"
            )));
        }
        let current = lb.status.vip.clone();
        let ttl = VIP_LEASE_TTL_MS;
        if release {
            let lb = self.lb_mut(project, name);
            if current.as_ref().and_then(|l| l.holder.as_deref()) == Some(node) {
                if let Some(l) = lb.status.vip.as_mut() {
                    l.holder = None;
                    l.expires_at.clone_from(&env.time);
                }
                let out = lb.status.vip.clone();
                self.event(
                    env,
                    project,
                    "loadbalancer",
                    name,
                    "VipReleased",
                    format!("{vip} released by {node}"),
                );
                return Ok(lease_output(false, out, ttl));
            }
            return Ok(lease_output(false, current, ttl));
        }
        if !ready {
            return Err(ApiError::conflict(format!(
                "node {node} is not ready or does not serve {project}/{name}, so it cannot hold its VIP"
            )));
        }
        let now = millis(&env.time).ok_or_else(|| {
            ApiError::internal(format!("command log time {:?} is not RFC 3339", env.time))
        })?;
        let holder_ready = current
            .as_ref()
            .and_then(|l| l.holder.as_deref())
            .is_some_and(|h| self.serves(project, name, h));
        let decision = decide(current.as_ref(), node, now, holder_ready);
        if let LeaseDecision::Refuse { holder, until } = &decision {
            return Err(ApiError::conflict(format!(
                "VIP {vip} is held by node {holder} until {until}"
            )));
        }
        let lease = VipLease {
            address: vip.to_string(),
            holder: Some(node.to_string()),
            renewed_at: env.time.clone(),
            expires_at: rfc3339(now + ttl as i64),
        };
        self.lb_mut(project, name).status.vip = Some(lease.clone());
        match decision {
            LeaseDecision::Acquire => self.event(
                env,
                project,
                "loadbalancer",
                name,
                "VipAcquired",
                format!("{vip} acquired by {node}"),
            ),
            LeaseDecision::Move { from } => self.event(
                env,
                project,
                "loadbalancer",
                name,
                "VipMoved",
                format!("{vip} moved from {from} to {node}"),
            ),
            LeaseDecision::Renew | LeaseDecision::Refuse { .. } => {}
        }
        Ok(lease_output(true, Some(lease), ttl))
    }

    fn lb_mut(&mut self, project: &str, name: &str) -> &mut nimbus_api::lb::LoadBalancer {
        self.loadbalancers
            .get_mut(&format!("{project}/{name}"))
            .expect("checked by the caller")
    }

    /// Whether a lease request by `node` would surely be refused at wall-clock `now_ms`
    /// (a read-only pre-check that spares the Raft log the requests of waiting nodes;
    /// granting is decided by `apply` only).
    pub fn vip_lease_refused(&self, project: &str, name: &str, node: &str, now_ms: i64) -> bool {
        let Some(l) = self
            .loadbalancer(project, name)
            .and_then(|lb| lb.status.vip.as_ref())
        else {
            return false;
        };
        let holder_ready = l
            .holder
            .as_deref()
            .is_some_and(|h| self.serves(project, name, h));
        matches!(
            decide(Some(l), node, now_ms, holder_ready),
            LeaseDecision::Refuse { .. }
        )
    }
}

fn lease_output(held: bool, lease: Option<VipLease>, ttl: u64) -> CommandOutput {
    CommandOutput::VipLease(VipLeaseResponse {
        held,
        lease,
        ttl_ms: ttl,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(holder: &str, expires: &str) -> VipLease {
        VipLease {
            address: "10.0.0.50".into(),
            holder: Some(holder.into()),
            renewed_at: "2026-01-01T00:00:00Z".into(),
            expires_at: expires.into(),
        }
    }

    #[test]
    fn decisions() {
        let t = millis("2026-01-01T00:00:01Z").unwrap();
        assert_eq!(decide(None, "a", t, false), LeaseDecision::Acquire);
        let l = lease("a", "2026-01-01T00:00:01.500Z");
        assert_eq!(decide(Some(&l), "a", t, true), LeaseDecision::Renew);
        assert!(matches!(
            decide(Some(&l), "b", t, true),
            LeaseDecision::Refuse { .. }
        ));
        // Holder down: taken at once.
        assert_eq!(
            decide(Some(&l), "b", t, false),
            LeaseDecision::Move { from: "a".into() }
        );
        // Expired exactly at the expiry time.
        assert_eq!(
            decide(Some(&l), "b", t + 500, true),
            LeaseDecision::Move { from: "a".into() }
        );
        let released = VipLease {
            holder: None,
            ..l.clone()
        };
        assert_eq!(
            decide(Some(&released), "b", t, true),
            LeaseDecision::Acquire
        );
        assert_eq!(rfc3339(t + 1500), "2026-01-01T00:00:02.500Z");
    }
}
