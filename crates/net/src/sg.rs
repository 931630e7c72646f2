//! Security groups compiled into nftables set elements (pure).
//!
//! Every local instance gets, per direction, elements keyed by its own address: `inst . peer`
//! for rules of protocol `all`, `inst . peer` in a separate set for ICMP, and
//! `inst . peer . proto . ports` for TCP/UDP. A peer is a CIDR or, for a rule naming a group,
//! each member's /32. nftables refuses overlapping elements in a concatenated interval set, so
//! the elements of one instance are reduced to a disjoint cover first: nested CIDRs collapse
//! into the outer one, and port ranges are cut at every rule boundary and merged back where
//! the covering CIDRs agree. A rule change therefore touches only the elements it really
//! changes, which the planner adds and deletes incrementally.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use nimbus_api::agent::{GroupPlan, InstancePlan};
use nimbus_api::cidr::Cidr;
use nimbus_api::{Direction, Protocol};

/// The SG elements of one direction, as canonical nft element text.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirectionElements {
    /// `inst . peer` (every protocol).
    pub any: BTreeSet<String>,
    /// `inst . peer` (ICMP).
    pub icmp: BTreeSet<String>,
    /// `inst . peer . proto . port[-port]` (TCP/UDP).
    pub ports: BTreeSet<String>,
}

/// Canonical nft text of a CIDR inside an element: a /32 is a bare address.
pub fn cidr_text(c: Cidr) -> String {
    if c.prefix_len() == 32 {
        c.network().to_string()
    } else {
        c.to_string()
    }
}

/// Canonical nft text of a port range.
pub fn ports_text(lo: u16, hi: u16) -> String {
    if lo == hi {
        lo.to_string()
    } else {
        format!("{lo}-{hi}")
    }
}

/// Keeps only the CIDRs not contained in another one of the list (they are then disjoint,
/// since two CIDRs either nest or do not meet).
pub fn maximal(cidrs: &BTreeSet<Cidr>) -> Vec<Cidr> {
    let mut out: Vec<Cidr> = Vec::new();
    // Shorter prefixes first: an outer network is seen before what it contains.
    let mut sorted: Vec<Cidr> = cidrs.iter().copied().collect();
    sorted.sort_by_key(|c| (c.prefix_len(), *c));
    for c in sorted {
        if !out.iter().any(|o| o.contains_cidr(c)) {
            out.push(c);
        }
    }
    out.sort();
    out
}

/// A disjoint cover of the union of the rectangles `peer x [lo, hi]`.
pub fn disjoint(rects: &[(Cidr, u16, u16)]) -> Vec<(Cidr, u16, u16)> {
    if rects.is_empty() {
        return Vec::new();
    }
    // Elementary intervals between every boundary.
    let mut cuts: BTreeSet<u32> = BTreeSet::new();
    for &(_, lo, hi) in rects {
        cuts.insert(u32::from(lo));
        cuts.insert(u32::from(hi) + 1);
    }
    let cuts: Vec<u32> = cuts.into_iter().collect();
    let mut pieces: Vec<(u32, u32, Vec<Cidr>)> = Vec::new();
    for w in cuts.windows(2) {
        let (lo, hi) = (w[0], w[1] - 1);
        let covering: BTreeSet<Cidr> = rects
            .iter()
            .filter(|&&(_, a, b)| u32::from(a) <= lo && hi <= u32::from(b))
            .map(|&(c, _, _)| c)
            .collect();
        if covering.is_empty() {
            continue;
        }
        let peers = maximal(&covering);
        match pieces.last_mut() {
            Some(last) if last.1 + 1 == lo && last.2 == peers => last.1 = hi,
            _ => pieces.push((lo, hi, peers)),
        }
    }
    let mut out = Vec::new();
    for (lo, hi, peers) in pieces {
        for p in peers {
            out.push((p, lo as u16, hi as u16));
        }
    }
    out
}

/// The peers a rule names: its CIDR, or the /32 of every member of its group.
fn peers(rule: &nimbus_api::SecurityGroupRule, groups: &BTreeMap<&str, &GroupPlan>) -> Vec<Cidr> {
    if let Some(c) = &rule.cidr {
        return Cidr::parse(c).into_iter().collect();
    }
    let Some(g) = rule.group.as_deref().and_then(|k| groups.get(k)) else {
        return Vec::new();
    };
    g.members
        .iter()
        .filter_map(|m| m.parse::<Ipv4Addr>().ok())
        .map(Cidr::host)
        .collect()
}

/// The elements of `direction` for the local instances.
pub fn elements(
    instances: &[InstancePlan],
    groups: &[GroupPlan],
    direction: Direction,
) -> DirectionElements {
    let by_key: BTreeMap<&str, &GroupPlan> = groups.iter().map(|g| (g.key.as_str(), g)).collect();
    let mut out = DirectionElements::default();
    for inst in instances {
        let mut any: BTreeSet<Cidr> = BTreeSet::new();
        let mut icmp: BTreeSet<Cidr> = BTreeSet::new();
        let mut ports: BTreeMap<Protocol, Vec<(Cidr, u16, u16)>> = BTreeMap::new();
        for gk in &inst.groups {
            let Some(g) = by_key.get(gk.as_str()) else {
                continue;
            };
            for r in g.rules.iter().filter(|r| r.direction == direction) {
                let p = peers(r, &by_key);
                match r.protocol {
                    Protocol::All => any.extend(p),
                    Protocol::Icmp => icmp.extend(p),
                    Protocol::Tcp | Protocol::Udp => ports
                        .entry(r.protocol)
                        .or_default()
                        .extend(p.into_iter().map(|c| (c, r.port_min, r.port_max))),
                }
            }
        }
        let ip = &inst.ip;
        for c in maximal(&any) {
            out.any.insert(format!("{ip} . {}", cidr_text(c)));
        }
        for c in maximal(&icmp) {
            out.icmp.insert(format!("{ip} . {}", cidr_text(c)));
        }
        for (proto, rects) in ports {
            for (c, lo, hi) in disjoint(&rects) {
                out.ports.insert(format!(
                    "{ip} . {} . {} . {}",
                    cidr_text(c),
                    proto.as_str(),
                    ports_text(lo, hi)
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use nimbus_api::{InstanceType, SecurityGroupRule};

    fn c(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    fn rule(dir: Direction, proto: Protocol, ports: (u16, u16), peer: &str) -> SecurityGroupRule {
        let (cidr, group) = if Cidr::parse(peer).is_ok() {
            (Some(peer.to_string()), None)
        } else {
            (None, Some(peer.to_string()))
        };
        SecurityGroupRule {
            id: String::new(),
            direction: dir,
            protocol: proto,
            port_min: ports.0,
            port_max: ports.1,
            cidr,
            group,
            description: String::new(),
        }
    }

    #[test]
    fn maximal_collapses_nested() {
        let set: BTreeSet<Cidr> = [c("10.0.0.0/8"), c("10.1.0.0/16"), c("192.168.1.7/32")]
            .into_iter()
            .collect();
        assert_eq!(maximal(&set), vec![c("10.0.0.0/8"), c("192.168.1.7/32")]);
    }

    #[test]
    fn disjoint_cover_is_disjoint_and_complete() {
        let rects = vec![
            (c("10.0.0.0/8"), 80, 90),
            (c("10.0.0.0/8"), 85, 100),
            (c("10.1.0.0/16"), 1, 65535),
            (c("192.168.0.0/24"), 443, 443),
        ];
        let out = disjoint(&rects);
        // Pairwise disjoint.
        for (i, a) in out.iter().enumerate() {
            for b in &out[i + 1..] {
                let ports_meet = a.1 <= b.2 && b.1 <= a.2;
                assert!(!(ports_meet && a.0.overlaps(b.0)), "{a:?} meets {b:?}");
            }
        }
        // Same coverage, checked on sample points.
        let covered = |set: &[(Cidr, u16, u16)], ip: &str, port: u16| {
            let ip: Ipv4Addr = ip.parse().unwrap();
            set.iter()
                .any(|&(c, lo, hi)| c.contains(ip) && lo <= port && port <= hi)
        };
        for ip in ["10.0.0.1", "10.1.2.3", "10.2.0.1", "192.168.0.9", "8.8.8.8"] {
            for port in [1, 79, 80, 85, 90, 95, 100, 101, 443, 65535] {
                assert_eq!(
                    covered(&out, ip, port),
                    covered(&rects, ip, port),
                    "{ip}:{port} in {out:?}"
                );
            }
        }
        // 10.0.0.0/8 80-100 is one element after merging the cut at 85/90.
        assert!(out.contains(&(c("10.0.0.0/8"), 80, 100)), "{out:?}");
    }

    #[test]
    fn elements_expand_groups() {
        let web = GroupPlan {
            key: "p/web".into(),
            rules: vec![
                rule(Direction::Ingress, Protocol::All, (0, 0), "p/web"),
                rule(Direction::Ingress, Protocol::Tcp, (8080, 8080), "p/client"),
                rule(Direction::Ingress, Protocol::Icmp, (0, 0), "0.0.0.0/0"),
                rule(Direction::Egress, Protocol::All, (0, 0), "0.0.0.0/0"),
            ],
            members: vec!["10.0.0.2".into(), "10.0.0.3".into()],
        };
        let client = GroupPlan {
            key: "p/client".into(),
            rules: vec![],
            members: vec!["10.0.0.9".into()],
        };
        let inst = InstancePlan {
            id: "i".into(),
            instance_type: InstanceType::Container,
            network: "n".into(),
            ip: "10.0.0.2".into(),
            mac: "0a:00:00:00:00:01".into(),
            groups: vec!["p/web".into()],
            publish: vec![],
        };
        let ing = elements(
            std::slice::from_ref(&inst),
            &[web.clone(), client.clone()],
            Direction::Ingress,
        );
        assert_eq!(
            ing.any,
            ["10.0.0.2 . 10.0.0.2", "10.0.0.2 . 10.0.0.3"]
                .into_iter()
                .map(String::from)
                .collect()
        );
        assert_eq!(
            ing.ports,
            ["10.0.0.2 . 10.0.0.9 . tcp . 8080".to_string()].into()
        );
        assert_eq!(ing.icmp, ["10.0.0.2 . 0.0.0.0/0".to_string()].into());
        let eg = elements(&[inst], &[web, client], Direction::Egress);
        assert_eq!(eg.any, ["10.0.0.2 . 0.0.0.0/0".to_string()].into());
        assert!(eg.ports.is_empty());
    }
}
