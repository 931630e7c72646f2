//! The node's nftables datapath, planned purely: the tables nimbus owns (`inet <table>` for
//! security groups, network isolation, egress masquerade, published-port DNAT and host
//! protection (instances reach only the LB listeners of the node's own addresses);
//! `bridge <table>` for anti-spoofing and IPv6 on instance ports), their set elements derived
//! from the network map, the elements read back from `nft -j list table`, and the script
//! that moves one to the other by adding and deleting elements only. A table that is missing
//! or has another layout is replaced whole in one atomic transaction; a node with no
//! instances has no tables at all.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use nimbus_api::agent::NetworkMap;
use nimbus_api::cidr::Cidr;
use nimbus_api::{bridge_name, Direction};
use serde_json::Value;

use crate::sg;

/// Marks the layout below; bump it when a chain or set changes.
const SCHEMA_CHAIN: &str = "schema_v4";

/// What a set or map field holds (decides the canonical text of an element).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    /// An interface name (quoted in nft syntax).
    Ifname,
    /// An IPv4 address or prefix.
    Ipv4,
    /// A protocol name.
    Proto,
    /// A port or port range.
    Port,
}

/// One named set (or map, with `value` fields) of a table.
#[derive(Debug, Clone)]
pub struct SetSpec {
    /// Name.
    pub name: &'static str,
    /// Key fields.
    pub key: &'static [Field],
    /// Value fields of a map (empty for a set).
    pub value: &'static [Field],
    /// The declaration inside the table.
    pub decl: &'static str,
}

/// A table nimbus owns.
#[derive(Debug, Clone)]
pub struct TableSpec {
    /// `inet` or `bridge`.
    pub family: &'static str,
    /// Sets and maps.
    pub sets: &'static [SetSpec],
    /// Chains: name, declaration (with its rules, which use `@set` references).
    pub chains: &'static [(&'static str, &'static str)],
}

use Field::{Ifname, Ipv4, Port, Proto};

/// The `inet` table: security groups, isolation between networks, NAT.
pub const INET: TableSpec = TableSpec {
    family: "inet",
    sets: &[
        SetSpec { name: "bridges", key: &[Ifname], value: &[], decl: "type ifname;" },
        SetSpec { name: "same_bridge", key: &[Ifname, Ifname], value: &[], decl: "type ifname . ifname;" },
        SetSpec { name: "local4", key: &[Ipv4], value: &[], decl: "type ipv4_addr;" },
        SetSpec { name: "vpc_cidrs", key: &[Ipv4], value: &[], decl: "type ipv4_addr; flags interval;" },
        SetSpec { name: "in_any", key: &[Ipv4, Ipv4], value: &[], decl: "type ipv4_addr . ipv4_addr; flags interval;" },
        SetSpec { name: "in_icmp", key: &[Ipv4, Ipv4], value: &[], decl: "type ipv4_addr . ipv4_addr; flags interval;" },
        SetSpec { name: "in_ports", key: &[Ipv4, Ipv4, Proto, Port], value: &[], decl: "type ipv4_addr . ipv4_addr . inet_proto . inet_service; flags interval;" },
        SetSpec { name: "out_any", key: &[Ipv4, Ipv4], value: &[], decl: "type ipv4_addr . ipv4_addr; flags interval;" },
        SetSpec { name: "out_icmp", key: &[Ipv4, Ipv4], value: &[], decl: "type ipv4_addr . ipv4_addr; flags interval;" },
        SetSpec { name: "out_ports", key: &[Ipv4, Ipv4, Proto, Port], value: &[], decl: "type ipv4_addr . ipv4_addr . inet_proto . inet_service; flags interval;" },
        SetSpec { name: "publish", key: &[Proto, Port], value: &[Ipv4, Port], decl: "type inet_proto . inet_service : ipv4_addr . inet_service;" },
        SetSpec { name: "nodes4", key: &[Ipv4], value: &[], decl: "type ipv4_addr;" },
        SetSpec { name: "host_snat", key: &[Ipv4], value: &[Ipv4], decl: "type ipv4_addr : ipv4_addr;" },
        SetSpec { name: "tunnel_ports", key: &[Port], value: &[], decl: "type inet_service;" },
        SetSpec { name: "host_open", key: &[Proto, Port], value: &[], decl: "type inet_proto . inet_service;" },
    ],
    chains: &[
        (SCHEMA_CHAIN, ""),
        // VXLAN packets between nodes are not connection-tracked: the instances' own
        // connections inside them are (on the bridge), and tracking the outer UDP flow too
        // costs two lookups per packet on each node for nothing.
        ("raw_pre", "type filter hook prerouting priority raw; policy accept;\n    ip saddr @nodes4 udp dport @tunnel_ports notrack"),
        ("raw_out", "type filter hook output priority raw; policy accept;\n    ip daddr @nodes4 udp dport @tunnel_ports notrack"),
        ("filter_forward", "type filter hook forward priority filter; policy accept;\n    ct state established,related accept\n    iifname @bridges oifname @bridges ct status & dnat == 0 iifname . oifname != @same_bridge drop\n    ip saddr @local4 jump sg_egress\n    ip daddr @local4 jump sg_ingress"),
        ("sg_egress", "ip saddr . ip daddr @out_any return\n    meta l4proto icmp ip saddr . ip daddr @out_icmp return\n    ip saddr . ip daddr . meta l4proto . th dport @out_ports return\n    counter drop"),
        ("sg_ingress", "ct status dnat return\n    ip saddr @nodes4 return\n    ip daddr . ip saddr @in_any return\n    meta l4proto icmp ip daddr . ip saddr @in_icmp return\n    ip daddr . ip saddr . meta l4proto . th dport @in_ports return\n    counter drop"),
        // Host protection: instances reach none of the node's own services (agent and server
        // APIs, Raft, sshd, any listener on any of its addresses, bridge gateways included)
        // except what nimbus serves them on purpose: load-balancer listeners (`host_open`) and
        // published ports (DNATed to an instance before this hook). Replies to connections the
        // host opened, and ping, pass.
        ("host_in", "type filter hook input priority filter; policy accept;\n    iifname != @bridges return\n    ct state established,related accept\n    ct status dnat accept\n    meta l4proto . th dport @host_open accept\n    icmp type echo-request accept\n    counter drop"),
        ("nat_pre", "type nat hook prerouting priority dstnat; policy accept;\n    fib daddr type local dnat ip to meta l4proto . th dport map @publish"),
        ("nat_out", "type nat hook output priority -100; policy accept;\n    ip daddr != 127.0.0.0/8 fib daddr type local dnat ip to meta l4proto . th dport map @publish"),
        ("nat_post", "type nat hook postrouting priority srcnat; policy accept;\n    fib saddr type local snat ip to ip daddr map @host_snat\n    ip saddr @vpc_cidrs oifname != @bridges masquerade\n    ct status dnat ip saddr @vpc_cidrs oifname @bridges masquerade"),
    ],
};

/// The `bridge` table: instance ports may only send from their own address, and carry no
/// IPv6 (security groups are IPv4).
pub const BRIDGE: TableSpec = TableSpec {
    family: "bridge",
    sets: &[
        SetSpec { name: "ports", key: &[Ifname], value: &[], decl: "type ifname;" },
        SetSpec { name: "port_ips", key: &[Ifname, Ipv4], value: &[], decl: "type ifname . ipv4_addr;" },
    ],
    chains: &[
        (SCHEMA_CHAIN, ""),
        ("port_pre", "type filter hook prerouting priority filter; policy accept;\n    iifname @ports ether type ip6 drop\n    iifname @ports ether type ip iifname . ip saddr != @port_ips drop\n    iifname @ports ether type arp iifname . arp saddr ip != @port_ips drop"),
        ("port_post", "type filter hook postrouting priority filter; policy accept;\n    oifname @ports ether type ip6 drop"),
    ],
};

impl TableSpec {
    /// The table with its sets and chains, without elements.
    pub fn skeleton(&self, table: &str) -> String {
        let mut s = format!("table {} {table} {{\n", self.family);
        for set in self.sets {
            let kind = if set.value.is_empty() { "set" } else { "map" };
            let _ = writeln!(s, "  {kind} {} {{ {} }}", set.name, set.decl);
        }
        for (name, body) in self.chains {
            let _ = writeln!(s, "  chain {name} {{\n    {body}\n  }}");
        }
        s.push_str("}\n");
        s
    }

    /// Rules per chain, as the layout check compares them.
    fn layout(&self) -> Layout {
        Layout {
            sets: self.sets.iter().map(|s| s.name.to_string()).collect(),
            chains: self
                .chains
                .iter()
                .map(|(n, body)| {
                    let rules = body
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty() && !l.starts_with("type "))
                        .count();
                    ((*n).to_string(), rules)
                })
                .collect(),
        }
    }
}

/// Set names and rules per chain of a table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Layout {
    /// Set and map names.
    pub sets: BTreeSet<String>,
    /// Chain name -> number of rules.
    pub chains: BTreeMap<String, usize>,
}

/// A table as read from the kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableState {
    /// Its layout.
    pub layout: Layout,
    /// Canonical elements per set.
    pub elements: BTreeMap<String, BTreeSet<String>>,
    /// Some element could not be read (the table is then replaced whole).
    pub unreadable: bool,
}

/// The desired elements of both tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// `inet` set -> elements.
    pub inet: BTreeMap<String, BTreeSet<String>>,
    /// `bridge` set -> elements.
    pub bridge: BTreeMap<String, BTreeSet<String>>,
    /// No instances on the node: the tables must not exist.
    pub empty: bool,
}

impl Desired {
    /// Opens `ports` of the node's own addresses to its instances: the listeners nimbus serves
    /// on the node (its load balancers' ports, bound on every address). Everything else an
    /// instance sends to the node itself is dropped (`host_in`).
    pub fn open_to_instances(
        &mut self,
        ports: impl IntoIterator<Item = (nimbus_api::Protocol, u16)>,
    ) {
        let open = self.inet.entry("host_open".to_string()).or_default();
        for (proto, port) in ports {
            if matches!(proto, nimbus_api::Protocol::Tcp | nimbus_api::Protocol::Udp) {
                open.insert(format!("{} . {port}", proto.as_str()));
            }
        }
    }
}

fn q(s: &str) -> String {
    format!("\"{s}\"")
}

/// The desired elements for `map`; `ifname` gives an instance's host interface.
pub fn desired(
    map: &NetworkMap,
    ifname: impl Fn(&nimbus_api::agent::InstancePlan) -> String,
) -> Desired {
    let mut inet: BTreeMap<String, BTreeSet<String>> = INET
        .sets
        .iter()
        .map(|s| (s.name.to_string(), BTreeSet::new()))
        .collect();
    let mut bridge: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let add = |m: &mut BTreeMap<String, BTreeSet<String>>, set: &str, e: String| {
        m.entry(set.to_string()).or_default().insert(e);
    };
    for n in &map.networks {
        let b = q(&bridge_name(&map.prefix, n.vni));
        add(&mut inet, "bridges", b.clone());
        add(&mut inet, "same_bridge", format!("{b} . {b}"));
        if let Ok(c) = Cidr::parse(&n.cidr) {
            add(&mut inet, "vpc_cidrs", sg::cidr_text(c));
        }
    }
    for n in &map.nodes {
        add(&mut inet, "nodes4", n.clone());
    }
    if map.vxlan_port != 0 {
        add(&mut inet, "tunnel_ports", map.vxlan_port.to_string());
    }
    // The node's own traffic to an instance on another node leaves with the node's underlay
    // address, so the reply comes back here rather than to that node's copy of the gateway.
    for r in map.networks.iter().flat_map(|n| &n.remote) {
        add(
            &mut inet,
            "host_snat",
            format!("{} : {}", r.ip, map.underlay_ip),
        );
    }
    for i in &map.instances {
        add(&mut inet, "local4", i.ip.clone());
        let port = q(&ifname(i));
        add(&mut bridge, "ports", port.clone());
        add(&mut bridge, "port_ips", format!("{port} . {}", i.ip));
        for p in &i.publish {
            add(
                &mut inet,
                "publish",
                format!(
                    "{} . {} : {} . {}",
                    p.protocol.as_str(),
                    p.host_port,
                    i.ip,
                    p.port
                ),
            );
        }
    }
    for (dir, prefix) in [(Direction::Ingress, "in"), (Direction::Egress, "out")] {
        let e = sg::elements(&map.instances, &map.security_groups, dir);
        inet.insert(format!("{prefix}_any"), e.any);
        inet.insert(format!("{prefix}_icmp"), e.icmp);
        inet.insert(format!("{prefix}_ports"), e.ports);
    }
    for s in BRIDGE.sets {
        bridge.entry(s.name.to_string()).or_default();
    }
    Desired {
        inet,
        bridge,
        empty: map.instances.is_empty(),
    }
}

fn key_text(spec: &SetSpec, elem: &str) -> String {
    if spec.value.is_empty() {
        elem.to_string()
    } else {
        elem.split(" : ").next().unwrap_or(elem).to_string()
    }
}

fn element_lines(
    out: &mut String,
    verb: &str,
    family: &str,
    table: &str,
    set: &str,
    elems: &[&str],
) {
    for chunk in elems.chunks(256) {
        let _ = writeln!(
            out,
            "{verb} element {family} {table} {set} {{ {} }}",
            chunk.join(", ")
        );
    }
}

/// The script moving table `table` of `spec` from `actual` (`None`: absent) to `want`
/// (`None`: must not exist). Empty when nothing changes. Returns the script and the number
/// of element changes.
pub fn plan_table(
    spec: &TableSpec,
    table: &str,
    actual: Option<&TableState>,
    want: Option<&BTreeMap<String, BTreeSet<String>>>,
) -> (String, usize) {
    let mut out = String::new();
    let Some(want) = want else {
        if actual.is_some() {
            let _ = writeln!(out, "delete table {} {table}", spec.family);
        }
        return (out, 0);
    };
    let layout_ok = actual.is_some_and(|a| !a.unreadable && a.layout == spec.layout());
    let empty = BTreeSet::new();
    let mut changes = 0;
    if !layout_ok {
        // Missing or another layout: replace the table and its elements atomically.
        let _ = writeln!(out, "table {} {table} {{}}", spec.family);
        let _ = writeln!(out, "delete table {} {table}", spec.family);
        out.push_str(&spec.skeleton(table));
        for s in spec.sets {
            let elems: Vec<&str> = want
                .get(s.name)
                .unwrap_or(&empty)
                .iter()
                .map(String::as_str)
                .collect();
            changes += elems.len();
            element_lines(&mut out, "add", spec.family, table, s.name, &elems);
        }
        return (out, changes.max(1));
    }
    let actual = actual.expect("layout_ok implies present");
    for s in spec.sets {
        let have = actual.elements.get(s.name).unwrap_or(&empty);
        let want = want.get(s.name).unwrap_or(&empty);
        let del: Vec<String> = have.difference(want).map(|e| key_text(s, e)).collect();
        let add: Vec<&str> = want.difference(have).map(String::as_str).collect();
        changes += del.len() + add.len();
        let del: Vec<&str> = del.iter().map(String::as_str).collect();
        element_lines(&mut out, "delete", spec.family, table, s.name, &del);
        element_lines(&mut out, "add", spec.family, table, s.name, &add);
    }
    (out, changes)
}

/// Canonical text of one JSON field value.
fn field_text(f: Field, v: &Value) -> Option<String> {
    match (f, v) {
        (Field::Ifname, Value::String(s)) => Some(q(s)),
        (Field::Ipv4 | Field::Proto, Value::String(s)) => Some(s.clone()),
        (Field::Proto, Value::Number(n)) => Some(match n.as_u64()? {
            6 => "tcp".into(),
            17 => "udp".into(),
            1 => "icmp".into(),
            other => other.to_string(),
        }),
        (Field::Port, Value::Number(n)) => Some(n.to_string()),
        (Field::Ipv4, Value::Object(o)) => {
            let p = o.get("prefix")?;
            let addr = p.get("addr")?.as_str()?;
            let len = p.get("len")?.as_u64()?;
            Some(if len == 32 {
                addr.to_string()
            } else {
                format!("{addr}/{len}")
            })
        }
        (Field::Port, Value::Object(o)) => {
            let range = o.get("range")?.as_array()?;
            let (lo, hi) = (range.first()?.as_u64()?, range.get(1)?.as_u64()?);
            Some(sg::ports_text(lo as u16, hi as u16))
        }
        (_, Value::Object(o)) if o.contains_key("elem") => {
            field_text(f, o.get("elem")?.get("val")?)
        }
        _ => None,
    }
}

fn tuple_text(fields: &[Field], v: &Value) -> Option<String> {
    let v = match v {
        Value::Object(o) if o.contains_key("elem") => o.get("elem")?.get("val")?,
        other => other,
    };
    if fields.len() == 1 {
        return field_text(fields[0], v);
    }
    let parts = v.get("concat")?.as_array()?;
    if parts.len() != fields.len() {
        return None;
    }
    let texts: Option<Vec<String>> = fields
        .iter()
        .zip(parts)
        .map(|(f, p)| field_text(*f, p))
        .collect();
    Some(texts?.join(" . "))
}

/// Parses `nft -j list table <family> <table>` into a [`TableState`] (sets of `spec` only).
pub fn parse_table(spec: &TableSpec, json: &str) -> Result<TableState, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("nft JSON: {e}"))?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("nft JSON without an nftables array")?;
    let mut st = TableState::default();
    for item in items {
        if let Some(set) = item.get("set").or_else(|| item.get("map")) {
            let name = set.get("name").and_then(Value::as_str).unwrap_or_default();
            st.layout.sets.insert(name.to_string());
            let Some(s) = spec.sets.iter().find(|s| s.name == name) else {
                continue;
            };
            let elems = st.elements.entry(name.to_string()).or_default();
            for e in set
                .get("elem")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let text = if s.value.is_empty() {
                    tuple_text(s.key, e)
                } else {
                    let pair = e.as_array();
                    pair.and_then(|p| {
                        Some(format!(
                            "{} : {}",
                            tuple_text(s.key, p.first()?)?,
                            tuple_text(s.value, p.get(1)?)?
                        ))
                    })
                };
                match text {
                    Some(t) => {
                        elems.insert(t);
                    }
                    None => st.unreadable = true,
                }
            }
        } else if let Some(c) = item.get("chain") {
            let name = c.get("name").and_then(Value::as_str).unwrap_or_default();
            st.layout.chains.entry(name.to_string()).or_insert(0);
        } else if let Some(r) = item.get("rule") {
            let chain = r.get("chain").and_then(Value::as_str).unwrap_or_default();
            *st.layout.chains.entry(chain.to_string()).or_insert(0) += 1;
        }
    }
    Ok(st)
}

#[cfg(test)]
mod tests;
