//! Unit tests of the L2 planner, with an in-memory kernel that applies the operations.

use super::*;
use nimbus_api::agent::{NetworkPlan, RemoteEndpoint, SubnetPlan};

fn map(remote: Vec<RemoteEndpoint>) -> NetworkMap {
    NetworkMap {
        revision: 7,
        prefix: "nt".into(),
        mtu: 1450,
        vxlan_port: 4789,
        underlay_ip: "10.250.0.1".into(),
        networks: vec![NetworkPlan {
            id: "n1".into(),
            project: "p".into(),
            name: "default".into(),
            vni: 100,
            cidr: "10.213.0.0/24".into(),
            subnets: vec![SubnetPlan {
                cidr: "10.213.0.0/24".into(),
                gateway: "10.213.0.1".into(),
            }],
            remote,
        }],
        security_groups: vec![],
        instances: vec![],
        nodes: vec![],
    }
}

fn remote(ip: &str, mac: &str, under: &str) -> RemoteEndpoint {
    RemoteEndpoint {
        ip: ip.into(),
        mac: mac.into(),
        underlay_ip: under.into(),
    }
}

/// Applies operations the way the kernel would.
fn apply(a: &mut Actual, ops: &[Op]) {
    let mut next = a.links.iter().map(|l| l.index).max().unwrap_or(0) + 1;
    for op in ops {
        match op {
            Op::CreateBridge { name } => {
                a.links.push(LinkState {
                    name: name.clone(),
                    index: next,
                    kind: Kind::Bridge {
                        nf_call_iptables: false,
                    },
                    master: None,
                    mac: vec![2, 0, 0, 0, 0, 9],
                    up: false,
                });
                next += 1;
            }
            Op::ConfigureBridge { name, mac } => {
                let l = a.links.iter_mut().find(|l| &l.name == name).unwrap();
                l.kind = Kind::Bridge {
                    nf_call_iptables: true,
                };
                l.mac = mac.to_vec();
                l.up = true;
            }
            Op::AddAddr { link, addr, len } => {
                a.addrs
                    .entry(link.clone())
                    .or_default()
                    .insert((*addr, *len));
            }
            Op::DelAddr { link, addr, len } => {
                a.addrs
                    .entry(link.clone())
                    .or_default()
                    .remove(&(*addr, *len));
            }
            Op::CreateVxlan { name, spec } => {
                a.links.push(LinkState {
                    name: name.clone(),
                    index: next,
                    kind: Kind::Vxlan {
                        vni: spec.vni,
                        local: Some(spec.local),
                        port: spec.port,
                        learning: false,
                        proxy: true,
                    },
                    master: None,
                    mac: vec![2, 0, 0, 0, 0, 8],
                    up: false,
                });
                next += 1;
            }
            Op::Attach { link, bridge } => {
                let b = a.links.iter().find(|l| &l.name == bridge).unwrap().index;
                let l = a.links.iter_mut().find(|l| &l.name == link).unwrap();
                l.master = Some(b);
                l.up = true;
            }
            Op::DeleteLink { name } => {
                a.links.retain(|l| &l.name != name);
                a.addrs.remove(name);
                a.fdb.retain(|f| &f.dev != name);
                a.neigh.retain(|n| &n.dev != name);
            }
            Op::FdbAdd(f) => {
                a.fdb.insert(f.clone());
            }
            Op::FdbDel(f) => {
                a.fdb.remove(f);
            }
            Op::NeighAdd(n) => {
                a.neigh.insert(n.clone());
            }
            Op::NeighDel(n) => {
                a.neigh.remove(n);
            }
        }
    }
}

#[test]
fn single_node_has_a_bridge_and_no_tunnel() {
    let w = want(&map(vec![]));
    assert_eq!(w.bridges.len(), 1);
    assert!(w.vxlans.is_empty() && w.fdb.is_empty());
    let b = &w.bridges["ntb100"];
    assert_eq!(b.mac, [0x02, 0x6e, 0x62, 0, 0, 100]);
    assert!(b.addrs.contains(&("10.213.0.1".parse().unwrap(), 24)));
}

#[test]
fn converges_and_then_is_a_noop() {
    let m = map(vec![
        remote("10.213.0.3", "0a:00:00:00:00:03", "10.250.0.2"),
        remote("10.213.0.4", "0a:00:00:00:00:04", "10.250.0.3"),
    ]);
    let w = want(&m);
    assert_eq!(w.vxlans["ntv100"].local.to_string(), "10.250.0.1");
    assert_eq!(w.fdb.len(), 2);
    let mut a = Actual::default();
    let ops = plan("nt", &w, &a);
    assert!(!ops.is_empty());
    apply(&mut a, &ops);
    assert_eq!(plan("nt", &w, &a), vec![], "re-planning must be a no-op");

    // An instance moves away, another arrives: only the differences.
    let m2 = map(vec![
        remote("10.213.0.3", "0a:00:00:00:00:03", "10.250.0.2"),
        remote("10.213.0.5", "0a:00:00:00:00:05", "10.250.0.2"),
    ]);
    let w2 = want(&m2);
    let ops = plan("nt", &w2, &a);
    assert_eq!(ops.len(), 4, "{ops:?}");
    assert!(ops.iter().all(|o| matches!(
        o,
        Op::FdbAdd(_) | Op::FdbDel(_) | Op::NeighAdd(_) | Op::NeighDel(_)
    )));
    apply(&mut a, &ops);
    assert_eq!(plan("nt", &w2, &a), vec![]);
}

#[test]
fn repairs_and_removes_stale_objects() {
    let m = map(vec![remote(
        "10.213.0.3",
        "0a:00:00:00:00:03",
        "10.250.0.2",
    )]);
    let w = want(&m);
    let mut a = Actual::default();
    let ops = plan("nt", &w, &a);
    apply(&mut a, &ops);
    // Someone deletes the FDB entry and adds a flooding entry and a wrong address.
    a.fdb.clear();
    a.fdb.insert(Fdb {
        dev: "ntv100".into(),
        mac: [0; 6],
        dst: "10.250.0.9".parse().unwrap(),
    });
    a.addrs
        .get_mut("ntb100")
        .unwrap()
        .insert(("10.213.9.1".parse().unwrap(), 24));
    let ops = plan("nt", &w, &a);
    assert_eq!(ops.len(), 3, "{ops:?}");
    apply(&mut a, &ops);
    assert_eq!(plan("nt", &w, &a), vec![]);

    // Everything deleted: the tunnel and the bridge go; other links stay.
    a.links.push(LinkState {
        name: "eth0".into(),
        index: 99,
        kind: Kind::Other,
        master: None,
        mac: vec![],
        up: true,
    });
    let ops = plan("nt", &Want::default(), &a);
    apply(&mut a, &ops);
    assert_eq!(
        a.links.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(),
        ["eth0"]
    );
    assert!(a.fdb.is_empty() && a.neigh.is_empty());
}

#[test]
fn a_bridge_with_instance_ports_is_kept() {
    let w = want(&map(vec![]));
    let mut a = Actual::default();
    let ops = plan("nt", &w, &a);
    apply(&mut a, &ops);
    let br = a.links[0].index;
    a.links.push(LinkState {
        name: "nv0123".into(),
        index: 50,
        kind: Kind::Other,
        master: Some(br),
        mac: vec![],
        up: true,
    });
    assert_eq!(plan("nt", &Want::default(), &a), vec![]);
    // Another prefix's objects are never touched.
    assert!(!owned("nt", "ntxb100", 'b'));
    assert!(owned("nt", "ntb100", 'b'));
    assert!(!owned("nt", "ntb", 'b'));
}

#[test]
fn a_wrong_vxlan_is_recreated_with_its_entries() {
    let m = map(vec![remote(
        "10.213.0.3",
        "0a:00:00:00:00:03",
        "10.250.0.2",
    )]);
    let w = want(&m);
    let mut a = Actual::default();
    let ops = plan("nt", &w, &a);
    apply(&mut a, &ops);
    for l in &mut a.links {
        if let Kind::Vxlan { learning, .. } = &mut l.kind {
            *learning = true;
        }
    }
    let ops = plan("nt", &w, &a);
    assert!(ops.contains(&Op::DeleteLink {
        name: "ntv100".into()
    }));
    apply(&mut a, &ops);
    assert_eq!(plan("nt", &w, &a), vec![]);
    assert_eq!(a.fdb.len(), 1);
}
