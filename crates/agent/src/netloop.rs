//! The node's datapath loop: converges bridges, VXLAN tunnels, FDB and neighbour entries and
//! the nftables tables to the network map the control plane publishes (at once on every new
//! map, and every few seconds to repair what was changed behind its back), and reports the
//! instances' interface counters.
//!
//! After each successful pass it publishes what it has [`Programmed`]: the instances (and
//! addresses) whose security groups, anti-spoofing entries and published ports are now in
//! force. The executor starts an instance's process only once it is there, so an instance is
//! never `running` unfiltered or unreachable. A pass needs nothing of the instance's own
//! interface (the nftables sets name it by its interface name), so it may run before, during
//! or after the driver creates it.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nimbus_api::agent::InstancePlan;
use nimbus_api::agent::StatusReport;
use nimbus_api::InterfaceCounters;
use nimbus_net::dataplane::{converge, instance_ifname};
use nimbus_net::Netlink;
use tokio::sync::watch;

use crate::runtime::Agent;

/// How often the datapath is re-read and repaired without a new map.
const REPAIR_EVERY: Duration = Duration::from_secs(10);
/// How often interface counters are reported.
const COUNTERS_EVERY: Duration = Duration::from_secs(10);

/// What the datapath has programmed: the instances of the last network map it converged to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Programmed {
    /// The map's revision.
    pub revision: u64,
    /// Instance id -> address.
    pub instances: HashMap<String, String>,
}

impl Programmed {
    fn of(map: &nimbus_api::agent::NetworkMap) -> Self {
        Self {
            revision: map.revision,
            instances: map
                .instances
                .iter()
                .map(|i| (i.id.clone(), i.ip.clone()))
                .collect(),
        }
    }

    /// Whether instance `id` with address `ip` is programmed.
    pub fn has(&self, id: &str, ip: &str) -> bool {
        self.instances.get(id).is_some_and(|a| a == ip)
    }
}

fn usable(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(a) if !a.is_unspecified() => Some(a),
        _ => None,
    }
}

fn source_towards(addr: SocketAddr) -> Option<Ipv4Addr> {
    let s = UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect(addr).ok()?;
    usable(s.local_addr().ok()?.ip())
}

/// The node's underlay address when none is configured: the agent's listen address if it is
/// a specific one, else the source address towards the first server, else towards the
/// default route; a loopback address only as a last resort (single-machine clouds).
pub fn detect_underlay(servers: &[String], listen: SocketAddr) -> Option<Ipv4Addr> {
    if let Some(a) = usable(listen.ip()).filter(|a| !a.is_loopback()) {
        return Some(a);
    }
    let server = servers.first().and_then(|u| {
        let rest = u.split("://").nth(1).unwrap_or(u);
        let hostport = rest.split('/').next()?;
        let hostport = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:80")
        };
        hostport.to_socket_addrs().ok()?.find(SocketAddr::is_ipv4)
    });
    let via_server = server.and_then(source_towards);
    if let Some(a) = via_server.filter(|a| !a.is_loopback()) {
        return Some(a);
    }
    source_towards(SocketAddr::from(([192, 0, 2, 1], 9)))
        .filter(|a| !a.is_loopback())
        .or(via_server)
}

impl Agent {
    /// Converges the datapath whenever the network map changes, and periodically.
    pub(crate) async fn net_loop(self: Arc<Self>, mut rx: watch::Receiver<u64>) {
        let nl = loop {
            match Netlink::connect().await {
                Ok(nl) => break nl,
                Err(e) => {
                    tracing::error!("datapath: cannot open netlink: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        };
        let mut last_counters = Instant::now();
        let mut sent: BTreeMap<String, InterfaceCounters> = BTreeMap::new();
        let mut failing = false;
        loop {
            let map = self.net_map.lock().expect("net map lock").clone();
            if let Some(map) = map {
                let table = self
                    .cfg
                    .nft_table
                    .clone()
                    .unwrap_or_else(|| map.prefix.clone());
                let started = Instant::now();
                let ifname = |i: &InstancePlan| self.ifname(i);
                match converge(&nl, &map, &table, &ifname).await {
                    Ok(c) => {
                        if !c.ops.is_empty() || c.nft_changes > 0 {
                            tracing::info!(
                                revision = map.revision,
                                netlink_ops = ?c.ops,
                                nft_changes = c.nft_changes,
                                elapsed = ?started.elapsed(),
                                "datapath converged"
                            );
                        }
                        failing = false;
                        let now = Programmed::of(&map);
                        // Wakes the executor only when the set of instances changed.
                        self.datapath.send_if_modified(|p| {
                            let changed = p.instances != now.instances;
                            *p = now;
                            changed
                        });
                    }
                    Err(e) => {
                        if !failing {
                            tracing::error!(
                                revision = map.revision,
                                "datapath convergence failed: {e}"
                            );
                        }
                        failing = true;
                    }
                }
                if last_counters.elapsed() >= COUNTERS_EVERY {
                    last_counters = Instant::now();
                    self.report_counters(&nl, &map, &mut sent).await;
                }
            }
            let wait = if failing {
                Duration::from_secs(1)
            } else {
                REPAIR_EVERY.min(COUNTERS_EVERY)
            };
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The host interface of an instance, as its driver names it.
    fn ifname(&self, i: &InstancePlan) -> String {
        self.drivers
            .get(&i.instance_type)
            .and_then(|d| d.host_interface(&i.id))
            .unwrap_or_else(|| instance_ifname(i))
    }

    async fn report_counters(
        &self,
        nl: &Netlink,
        map: &nimbus_api::agent::NetworkMap,
        sent: &mut BTreeMap<String, InterfaceCounters>,
    ) {
        let mut now = Vec::new();
        for i in &map.instances {
            let ifname = self.ifname(i);
            if let Ok(Some(c)) = nl.counters(&ifname).await {
                // The host side receives what the instance sends.
                now.push(InterfaceCounters {
                    instance: i.id.clone(),
                    interface: ifname,
                    rx_bytes: c.tx_bytes,
                    tx_bytes: c.rx_bytes,
                    rx_packets: c.tx_packets,
                    tx_packets: c.rx_packets,
                });
            }
        }
        let changed =
            now.len() != sent.len() || now.iter().any(|c| sent.get(&c.instance) != Some(c));
        if !changed || now.is_empty() {
            return;
        }
        let report = StatusReport {
            instances: Vec::new(),
            interfaces: now.clone(),
        };
        if self.link.report(&self.cfg.name, &report).await.is_ok() {
            *sent = now.into_iter().map(|c| (c.instance.clone(), c)).collect();
        }
    }
}
