//! Floating VIPs of load balancers on this node (the keepalived role).
//!
//! For every LB with a VIP this node may hold, the agent asks the control plane for the VIP's
//! lease (the holder every [`VIP_RENEW_MS`], the others every [`VIP_ACQUIRE_MS`]): the
//! holder's request renews it, the others' take it once it
//! expired (see `nimbus_state::vip`). While the node holds a lease it carries the VIP as a /32
//! on its underlay interface (netlink) and announces it with gratuitous ARP; the LB listeners
//! bind the wildcard address, so they serve the VIP as soon as it is there. The lease is held
//! until the TTL counted from *before* the last successful request, minus a margin: when the
//! agent cannot renew in time (control plane unreachable, link cut) it removes the address
//! on its own (fencing) before another node can get the lease. On shutdown it removes its
//! addresses and releases its leases.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nimbus_api::agent::LbAssignment;
use nimbus_api::lb::{VipLeaseRequest, VIP_ACQUIRE_MS, VIP_LEASE_TTL_MS, VIP_RENEW_MS};
use nimbus_net::vip::{send_garp, Iface};
use nimbus_net::Netlink;
use tokio::time::Instant;

use crate::runtime::Agent;
use crate::server_link::LinkError;

/// Prefix length of a VIP on the underlay interface.
const VIP_PREFIX: u8 = 32;
/// The node gives the address up this long before its lease could expire.
const FENCE_MARGIN: Duration = Duration::from_millis(150);
/// How often the address set is checked and repaired.
const TICK: Duration = Duration::from_millis(50);
/// How often the interface is re-read (addresses removed behind the agent's back).
const RESYNC_EVERY: Duration = Duration::from_secs(2);
/// Gratuitous ARPs after taking an address, as delays from the first one.
const GARP_AT_MS: [u64; 5] = [0, 100, 300, 700, 1500];

/// An LB's VIP and the nodes that may hold it (empty: any node serving the LB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VipTarget {
    /// LB project.
    pub project: String,
    /// LB name.
    pub name: String,
    /// The address.
    pub vip: Ipv4Addr,
    /// Allowed holders.
    pub nodes: Vec<String>,
}

type Key = (String, String);

impl VipTarget {
    fn key(&self) -> Key {
        (self.project.clone(), self.name.clone())
    }

    /// Whether `node` may hold this VIP.
    pub fn candidate(&self, node: &str) -> bool {
        self.nodes.is_empty() || self.nodes.iter().any(|n| n == node)
    }
}

/// The VIP targets of a node's LB assignments (pure).
pub fn targets(lbs: &[LbAssignment]) -> Vec<VipTarget> {
    lbs.iter()
        .filter_map(|a| {
            Some(VipTarget {
                project: a.project.clone(),
                name: a.name.clone(),
                vip: a.spec.vip.as_deref()?.parse().ok()?,
                nodes: a.spec.vip_nodes.clone(),
            })
        })
        .collect()
}

/// The addresses to carry at `now` (pure): the candidate targets whose lease, held for the
/// same address, has not run out.
pub fn wanted(
    node: &str,
    targets: &[VipTarget],
    held: &BTreeMap<Key, (Ipv4Addr, Instant)>,
    now: Instant,
) -> BTreeSet<Ipv4Addr> {
    targets
        .iter()
        .filter(|t| t.candidate(node))
        .filter(|t| {
            held.get(&t.key())
                .is_some_and(|(vip, until)| *vip == t.vip && *until > now)
        })
        .map(|t| t.vip)
        .collect()
}

/// Shared VIP state of the agent: the targets from the assignments and the leases held.
#[derive(Debug, Default)]
pub struct VipState {
    targets: Mutex<Vec<VipTarget>>,
    held: Mutex<BTreeMap<Key, (Ipv4Addr, Instant)>>,
    inflight: Mutex<HashSet<Key>>,
}

impl VipState {
    /// Replaces the targets (from new assignments).
    pub fn set_targets(&self, lbs: &[LbAssignment]) {
        *self.targets.lock().expect("vip lock") = targets(lbs);
    }

    fn holds(&self, vip: Ipv4Addr, now: Instant) -> bool {
        self.held
            .lock()
            .expect("vip lock")
            .values()
            .any(|(v, until)| *v == vip && *until > now)
    }
}

/// The file listing the VIPs this agent put on the node (so a restarted agent can remove
/// the ones a killed predecessor left behind).
fn record_path(data_dir: &Path) -> PathBuf {
    data_dir.join("vips.json")
}

fn record(data_dir: &Path, have: &BTreeSet<Ipv4Addr>) {
    let path = record_path(data_dir);
    let tmp = path.with_extension("json.tmp");
    let body = serde_json::to_vec(have).unwrap_or_default();
    if let Err(e) = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, &path)) {
        tracing::warn!("vip: recording {}: {e}", path.display());
    }
}

/// At agent start: removes the VIP addresses a previous agent process added (it holds no
/// lease any more as far as this process knows; the VIP loop takes them again if it gets the
/// lease).
pub async fn remove_stale(data_dir: &Path) {
    let Ok(body) = std::fs::read(record_path(data_dir)) else {
        return;
    };
    let stale: BTreeSet<Ipv4Addr> = serde_json::from_slice(&body).unwrap_or_default();
    if stale.is_empty() {
        return;
    }
    let Ok(nl) = Netlink::connect().await else {
        return;
    };
    for vip in &stale {
        match nl.iface_with_address(*vip).await {
            Ok(Some(ifc)) => match nl.del_address(ifc.index, *vip, VIP_PREFIX).await {
                Ok(()) => {
                    tracing::warn!(%vip, "vip: removed an address left by the previous agent process");
                }
                Err(e) => tracing::error!(%vip, "vip: removing a stale address failed: {e}"),
            },
            Ok(None) => {}
            Err(e) => tracing::error!(%vip, "vip: reading addresses: {e}"),
        }
    }
    record(data_dir, &BTreeSet::new());
}

impl Agent {
    fn underlay(&self) -> Option<Ipv4Addr> {
        self.cfg
            .underlay_ip
            .or_else(|| crate::netloop::detect_underlay(&self.cfg.servers, self.cfg.listen))
    }

    /// Keeps the leases and the addresses of this node's VIPs.
    pub(crate) async fn vip_loop(self: Arc<Self>) {
        let nl = loop {
            match Netlink::connect().await {
                Ok(nl) => break nl,
                Err(e) => {
                    tracing::error!("vip: cannot open netlink: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let mut iface: Option<Iface> = None;
        let mut have: BTreeSet<Ipv4Addr> = BTreeSet::new();
        let mut last_request: BTreeMap<Key, Instant> = BTreeMap::new();
        let mut last_sync: Option<Instant> = None;
        let mut warned = false;
        let node = self.cfg.name.clone();
        loop {
            tokio::time::sleep(TICK).await;
            let now = Instant::now();
            let all = self.vips.targets.lock().expect("vip lock").clone();
            if all.is_empty() && have.is_empty() {
                continue;
            }
            last_request.retain(|k, _| all.iter().any(|t| t.key() == *k));
            for t in all.iter().filter(|t| t.candidate(&node)) {
                let every = if self.vips.holds(t.vip, now) {
                    VIP_RENEW_MS
                } else {
                    VIP_ACQUIRE_MS
                };
                let due = last_request
                    .get(&t.key())
                    .is_none_or(|l| now - *l >= Duration::from_millis(every));
                if due {
                    last_request.insert(t.key(), now);
                    self.clone().request(t.clone());
                }
            }
            let Some(ifc) = iface else {
                match self.underlay() {
                    Some(u) => match nl.iface_with_address(u).await {
                        Ok(Some(i)) => iface = Some(i),
                        Ok(None) | Err(_) if !warned => {
                            warned = true;
                            tracing::error!(underlay = %u, "vip: no interface carries the underlay address; cannot hold VIPs");
                        }
                        _ => {}
                    },
                    None if !warned => {
                        warned = true;
                        tracing::error!("vip: no underlay address; cannot hold VIPs");
                    }
                    None => {}
                }
                continue;
            };
            if last_sync.is_none_or(|t| now - t >= RESYNC_EVERY) {
                last_sync = Some(now);
                for t in &all {
                    match nl.has_address(ifc.index, t.vip).await {
                        Ok(true) => {
                            have.insert(t.vip);
                        }
                        Ok(false) => {
                            have.remove(&t.vip);
                        }
                        Err(e) => tracing::warn!("vip: reading addresses: {e}"),
                    }
                }
            }
            let want = {
                let held = self.vips.held.lock().expect("vip lock");
                wanted(&node, &all, &held, now)
            };
            let before = have.clone();
            let add: Vec<Ipv4Addr> = want.difference(&have).copied().collect();
            for vip in add {
                match nl.add_address(ifc.index, vip.into(), VIP_PREFIX).await {
                    Ok(()) => {
                        tracing::info!(%vip, "VIP taken: address added, announcing with gratuitous ARP");
                        have.insert(vip);
                        self.clone().announce(ifc, vip);
                    }
                    Err(e) => tracing::error!(%vip, "vip: adding the address failed: {e}"),
                }
            }
            let remove: Vec<Ipv4Addr> = have.difference(&want).copied().collect();
            for vip in remove {
                match nl.del_address(ifc.index, vip, VIP_PREFIX).await {
                    Ok(()) => {
                        let lapsed = self
                            .vips
                            .held
                            .lock()
                            .expect("vip lock")
                            .values()
                            .any(|(v, until)| *v == vip && *until <= now);
                        if lapsed {
                            tracing::warn!(%vip, "VIP lease not renewed in time: address removed (fenced)");
                        } else {
                            tracing::info!(%vip, "VIP not held: address removed");
                        }
                        have.remove(&vip);
                    }
                    Err(e) => tracing::error!(%vip, "vip: removing the address failed: {e}"),
                }
            }
            if have != before {
                record(&self.cfg.data_dir, &have);
            }
        }
    }

    /// Sends one lease request for `t` (unless one is in flight) and records the answer.
    fn request(self: Arc<Self>, t: VipTarget) {
        let key = t.key();
        if !self
            .vips
            .inflight
            .lock()
            .expect("vip lock")
            .insert(key.clone())
        {
            return;
        }
        tokio::spawn(async move {
            let sent = Instant::now();
            let req = VipLeaseRequest {
                project: t.project.clone(),
                name: t.name.clone(),
                vip: t.vip.to_string(),
                release: false,
            };
            let ttl = Duration::from_millis(VIP_LEASE_TTL_MS);
            let r = self.link.vip_lease(&self.cfg.name, &req, ttl).await;
            {
                let mut held = self.vips.held.lock().expect("vip lock");
                match r {
                    Ok(resp) if resp.held => {
                        let ttl = Duration::from_millis(resp.ttl_ms);
                        held.insert(
                            key.clone(),
                            (t.vip, sent + ttl.saturating_sub(FENCE_MARGIN)),
                        );
                    }
                    Ok(_) | Err(LinkError::Refused(_)) => {
                        held.remove(&key);
                    }
                    // No answer: keep what we had; its deadline fences us.
                    Err(e) => tracing::debug!(vip = %t.vip, "vip: lease request failed: {e}"),
                }
            }
            self.vips.inflight.lock().expect("vip lock").remove(&key);
        });
    }

    /// Gratuitous ARPs for a freshly taken `vip`, while the lease is held.
    fn announce(self: Arc<Self>, ifc: Iface, vip: Ipv4Addr) {
        tokio::spawn(async move {
            let start = Instant::now();
            for at in GARP_AT_MS {
                tokio::time::sleep_until(start + Duration::from_millis(at)).await;
                if !self.vips.holds(vip, Instant::now()) {
                    return;
                }
                if let Err(e) = send_garp(ifc, vip) {
                    tracing::warn!(%vip, "vip: {e}");
                }
            }
        });
    }

    /// Removes this node's VIP addresses and releases their leases (agent shutdown).
    pub async fn release_vips(&self) {
        let held: Vec<(Key, Ipv4Addr)> =
            std::mem::take(&mut *self.vips.held.lock().expect("vip lock"))
                .into_iter()
                .map(|(k, (vip, _))| (k, vip))
                .collect();
        if held.is_empty() {
            return;
        }
        if let (Ok(nl), Some(u)) = (Netlink::connect().await, self.underlay()) {
            if let Ok(Some(ifc)) = nl.iface_with_address(u).await {
                for (_, vip) in &held {
                    if let Err(e) = nl.del_address(ifc.index, *vip, VIP_PREFIX).await {
                        tracing::error!(%vip, "vip: removing the address failed: {e}");
                    }
                }
                record(&self.cfg.data_dir, &BTreeSet::new());
            }
        }
        for ((project, name), vip) in held {
            let req = VipLeaseRequest {
                project,
                name,
                vip: vip.to_string(),
                release: true,
            };
            match self
                .link
                .vip_lease(&self.cfg.name, &req, Duration::from_secs(2))
                .await
            {
                Ok(_) => tracing::info!(%vip, "VIP released"),
                Err(e) => tracing::warn!(%vip, "vip: releasing the lease failed: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, vip: &str, nodes: &[&str]) -> VipTarget {
        VipTarget {
            project: "p".into(),
            name: name.into(),
            vip: vip.parse().unwrap(),
            nodes: nodes.iter().map(|s| (*s).to_string()).collect(),
        }
    }

    #[test]
    fn wanted_follows_live_leases_for_the_same_address() {
        let now = Instant::now();
        let later = now + Duration::from_secs(1);
        let ts = [
            t("a", "10.0.0.1", &[]),
            t("b", "10.0.0.2", &["n2"]),
            t("c", "10.0.0.3", &[]),
        ];
        let mut held = BTreeMap::new();
        held.insert(
            ("p".into(), "a".into()),
            ("10.0.0.1".parse().unwrap(), later),
        );
        // Not a candidate: never carried even with a lease.
        held.insert(
            ("p".into(), "b".into()),
            ("10.0.0.2".parse().unwrap(), later),
        );
        // A lease for the LB's old address does not cover its new one.
        held.insert(
            ("p".into(), "c".into()),
            ("10.0.0.9".parse().unwrap(), later),
        );
        let w = wanted("n1", &ts, &held, now);
        assert_eq!(
            w.into_iter().collect::<Vec<_>>(),
            ["10.0.0.1".parse::<Ipv4Addr>().unwrap()]
        );
        // Once the deadline passes, the address goes (fencing).
        assert!(wanted("n1", &ts, &held, later).is_empty());
        assert!(wanted("n2", &ts, &held, now).contains(&"10.0.0.2".parse().unwrap()));
    }
}
