//! The node's datapath loop: converges bridges, VXLAN tunnels, FDB and neighbour entries and
//! the nftables tables to the network map the control plane publishes (at once on every new
//! map, and every few seconds to repair what was changed behind its back), and reports the
//! instances' interface counters.
//!
//! The tables also protect the host: instances reach none of the node's own services on any
//! of its addresses, only the listeners of the load balancers assigned to the node
//! ([`lb_ports`], kept current by the watch loop, which wakes this loop when they change) and
//! their published ports.
//!
//! A pass reads the netlink objects (cheap) and plans them; for the nftables tables it plans
//! against what the previous pass left ([`Known`]) and runs one `nft -f` script, reading the
//! tables back (`nft -j list`) only on the first pass, on the repair tick, after a failure and
//! after a table was replaced whole: a new map is in force in one `nft` call.
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

use std::collections::BTreeSet;

use nimbus_api::agent::{InstancePlan, LbAssignment, NetworkMap, StatusReport};
use nimbus_api::lb::LbProtocol;
use nimbus_api::{InterfaceCounters, Protocol};
use nimbus_net::dataplane::{self, instance_ifname, Converged};
use nimbus_net::nft::{self, TableSpec, TableState};
use nimbus_net::{plan, NetError, Netlink};
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

/// What the agent knows of one of its nftables tables without reading it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
enum Known {
    /// Read it.
    #[default]
    Unknown,
    /// It does not exist.
    Absent,
    /// It is exactly this.
    Present(TableState),
}

/// The state of a table after a pass that planned `script` from `have` to `want` and ran it.
fn known_after(
    have: Option<TableState>,
    want: Option<&BTreeMap<String, BTreeSet<String>>>,
    script: &str,
) -> Known {
    match (want, have) {
        (None, _) => Known::Absent,
        // Replaced whole (missing, another layout): read its layout back next time.
        (Some(_), _) if script.contains("delete table") => Known::Unknown,
        (Some(w), Some(mut t)) if !t.unreadable => {
            t.elements.clone_from(w);
            Known::Present(t)
        }
        (Some(_), _) => Known::Unknown,
    }
}

/// Turns on IPv4 forwarding in this network namespace (instances' traffic is routed by the
/// host).
fn enable_forwarding() -> Result<(), NetError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let io = |source| NetError::Io {
        context: format!("enabling forwarding ({PATH})"),
        source,
    };
    if std::fs::read_to_string(PATH).map_err(io)?.trim() != "1" {
        std::fs::write(PATH, "1").map_err(io)?;
        tracing::info!("enabled IPv4 forwarding");
    }
    Ok(())
}

/// The ports of the node's own addresses that instances may reach: the listeners of the load
/// balancers assigned to this node (bound on every address; the host-protection chain drops
/// everything else instances send to the node).
pub(crate) fn lb_ports(assigned: &[LbAssignment]) -> BTreeSet<(Protocol, u16)> {
    assigned
        .iter()
        .flat_map(|a| &a.spec.listeners)
        .filter_map(|l| {
            let proto = match l.protocol {
                LbProtocol::Udp => Protocol::Udp,
                LbProtocol::Tcp | LbProtocol::Http | LbProtocol::Https => Protocol::Tcp,
            };
            Some((proto, u16::try_from(l.port).ok()?))
        })
        .collect()
}

/// One pass of the datapath to `map` (as `nimbus_net::dataplane::converge`), planning the
/// nftables tables against `known` and updating it; `open` are the ports of the node's own
/// addresses its instances may reach ([`lb_ports`]).
async fn datapath_pass(
    nl: &Netlink,
    map: &NetworkMap,
    open: &BTreeSet<(Protocol, u16)>,
    table: &str,
    ifname: &(dyn Fn(&InstancePlan) -> String + Sync),
    known: &mut [Known; 2],
) -> Result<Converged, NetError> {
    if !map.networks.is_empty() {
        enable_forwarding()?;
    }
    let want = plan::want(map);
    let actual = nl.datapath(&map.prefix).await?;
    let ops = plan::plan(&map.prefix, &want, &actual);
    for op in &ops {
        nl.apply(op).await?;
    }
    let mut desired = nft::desired(map, ifname);
    desired.open_to_instances(open.iter().copied());
    let specs: [(&TableSpec, &BTreeMap<String, BTreeSet<String>>); 2] =
        [(&nft::INET, &desired.inet), (&nft::BRIDGE, &desired.bridge)];
    let mut script = String::new();
    let mut changes = 0;
    let mut after: [Known; 2] = Default::default();
    for (i, (spec, want)) in specs.into_iter().enumerate() {
        let have = match &known[i] {
            Known::Present(t) => Some(t.clone()),
            Known::Absent => None,
            Known::Unknown => dataplane::read_table(spec, table).await?,
        };
        let want = (!desired.empty).then_some(want);
        let (s, n) = nft::plan_table(spec, table, have.as_ref(), want);
        after[i] = known_after(have, want, &s);
        script.push_str(&s);
        changes += n;
    }
    if !script.is_empty() {
        // Whatever happens, the tables are re-read unless this succeeds.
        *known = Default::default();
        dataplane::nft(&["-f", "-"], Some(&script)).await?;
    }
    *known = after;
    Ok(Converged {
        ops,
        nft_changes: changes,
    })
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
        let mut known: [Known; 2] = Default::default();
        let mut last_repair: Option<Instant> = None;
        loop {
            let map = self.net_map.lock().expect("net map lock").clone();
            let open = self.lb_ports.lock().expect("lb ports lock").clone();
            if let Some(map) = map {
                let table = self
                    .cfg
                    .nft_table
                    .clone()
                    .unwrap_or_else(|| map.prefix.clone());
                let started = Instant::now();
                let ifname = |i: &InstancePlan| self.ifname(i);
                if failing || last_repair.is_none_or(|t| t.elapsed() >= REPAIR_EVERY) {
                    // Read everything back: repair what was changed behind our back.
                    known = Default::default();
                    last_repair = Some(Instant::now());
                }
                let planned_from_knowledge = known != <[Known; 2]>::default();
                let mut result = datapath_pass(&nl, &map, &open, &table, &ifname, &mut known).await;
                if result.is_err() && planned_from_knowledge {
                    // Planned from stale knowledge (a table changed behind our back): read it.
                    known = Default::default();
                    result = datapath_pass(&nl, &map, &open, &table, &ifname, &mut known).await;
                }
                match result {
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
                let since = last_repair.map_or(Duration::ZERO, |t| t.elapsed());
                REPAIR_EVERY
                    .saturating_sub(since)
                    .min(COUNTERS_EVERY.saturating_sub(last_counters.elapsed()))
                    .max(Duration::from_millis(100))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sets(elems: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
        [(
            "ports".to_owned(),
            elems.iter().map(|e| (*e).to_owned()).collect(),
        )]
        .into()
    }

    #[test]
    fn lb_listeners_are_the_ports_open_to_instances() {
        let lb = |listeners: serde_json::Value| -> LbAssignment {
            serde_json::from_value(serde_json::json!({
                "id": "lb1", "project": "p", "name": "web", "version": 1,
                "spec": { "listeners": listeners, "backends": {}, "algorithm": "round_robin" },
                "backends": [], "route_backends": [],
            }))
            .expect("assignment")
        };
        let a = [
            lb(serde_json::json!([
                {"port": 80, "protocol": "http"},
                {"port": 443, "protocol": "https"},
                {"port": 53, "protocol": "udp"},
            ])),
            lb(serde_json::json!([{"port": 5432, "protocol": "tcp"}])),
        ];
        let want: BTreeSet<(Protocol, u16)> = [
            (Protocol::Tcp, 80),
            (Protocol::Tcp, 443),
            (Protocol::Udp, 53),
            (Protocol::Tcp, 5432),
        ]
        .into();
        assert_eq!(lb_ports(&a), want);
        assert!(lb_ports(&[]).is_empty());
    }

    #[test]
    fn known_tables_follow_what_a_pass_applied() {
        let read = TableState {
            elements: sets(&["\"nv1\""]),
            ..TableState::default()
        };
        let want = sets(&["\"nv1\"", "\"nv2\""]);
        // Elements added to a table of the right layout: known without reading it back.
        let k = known_after(
            Some(read.clone()),
            Some(&want),
            "add element bridge t ports { \"nv2\" }\n",
        );
        assert_eq!(
            k,
            Known::Present(TableState {
                elements: want.clone(),
                ..read.clone()
            })
        );
        // Replaced whole: its layout must be read back.
        let replaced = "table bridge t {}\ndelete table bridge t\ntable bridge t { }\n";
        assert_eq!(
            known_after(Some(read.clone()), Some(&want), replaced),
            Known::Unknown
        );
        assert_eq!(known_after(None, Some(&want), replaced), Known::Unknown);
        // Deleted (no instances left).
        assert_eq!(
            known_after(Some(read.clone()), None, "delete table bridge t\n"),
            Known::Absent
        );
        // An unreadable table is never trusted.
        let bad = TableState {
            unreadable: true,
            ..read
        };
        assert_eq!(known_after(Some(bad), Some(&want), ""), Known::Unknown);
    }
}
