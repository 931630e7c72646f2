//! Unit tests of tenant networking in the state machine: networks, IPAM, security groups,
//! published ports and the network map.

use std::collections::BTreeSet;

use nimbus_api::{
    AddRuleRequest, CreateNetworkRequest, CreateSecurityGroupRequest, ErrorCode, Instance,
    Protocol, PublishedPort, SubnetRequest,
};

use super::{inst, instance, H};
use crate::{netmap, Command, CommandOutput, InstanceAction};

fn launch(h: &mut H, name: &str, f: impl FnOnce(&mut Instance)) -> crate::CommandResult {
    let mut i = instance(name, 64 << 20);
    f(&mut i);
    h.run(Command::CreateInstance {
        instance: Box::new(i.into()),
        idempotency_key: None,
    })
}

fn net_req(name: &str, cidr: Option<&str>, subnets: &[(&str, &str)]) -> Command {
    Command::CreateNetwork {
        project: "default".into(),
        request: CreateNetworkRequest {
            name: name.into(),
            cidr: cidr.map(String::from),
            subnets: subnets
                .iter()
                .map(|(n, c)| SubnetRequest {
                    name: (*n).into(),
                    cidr: (*c).into(),
                })
                .collect(),
        },
    }
}

fn rule(
    group: &str,
    proto: &str,
    ports: Option<&str>,
    cidr: Option<&str>,
    peer: Option<&str>,
) -> Command {
    Command::AddSecurityGroupRule {
        project: "default".into(),
        group: group.into(),
        request: AddRuleRequest {
            direction: None,
            protocol: proto.into(),
            ports: ports.map(String::from),
            cidr: cidr.map(String::from),
            group: peer.map(String::from),
            description: String::new(),
        },
    }
}

fn delete(h: &mut H, name: &str) {
    h.ok(Command::SetInstanceDesired {
        project: "default".into(),
        name: name.into(),
        action: InstanceAction::Delete,
        version: None,
    });
    let i = h.sm.instance_by_name("default", name).unwrap().clone();
    h.ok(Command::ReportStatus {
        node: i.status.node.clone().unwrap(),
        reports: vec![nimbus_api::agent::InstanceReport {
            id: i.meta.id.clone(),
            generation: i.status.generation,
            state: nimbus_api::InstanceState::Stopped,
            pid: None,
            exit_code: None,
            message: String::new(),
            restart_count: 0,
            accelerator: None,
            deleted: true,
        }],
        interfaces: vec![],
    });
    assert!(h.sm.instance_by_name("default", name).is_none());
}

#[test]
fn first_launch_creates_the_default_network_and_group() {
    let mut h = H::new();
    h.node("n1", false);
    assert!(h.sm.networks.is_empty());
    let a = inst(launch(&mut h, "a", |_| {}).unwrap());
    let net = h.sm.network_by_name("default", "default").unwrap().clone();
    assert_eq!(net.cidr, "10.213.0.0/24");
    assert_eq!(net.vni, crate::network::FIRST_VNI);
    assert_eq!(net.subnets[0].gateway, "10.213.0.1");
    assert_eq!(a.spec.network, "default");
    assert_eq!(a.spec.subnet, "default");
    assert_eq!(a.spec.security_groups, vec!["default".to_string()]);
    let g = h.sm.security_group_by_name("default", "default").unwrap();
    assert_eq!(g.rules.len(), 2);
    assert_eq!(h.sm.network_revision("n1"), h.sm.revision);
    // A second project gets its own network with another CIDR and VNI.
    h.ok(Command::CreateProject {
        name: "other".into(),
        description: String::new(),
        idempotency_key: None,
    });
    let mut o = instance("x", 64 << 20);
    o.meta.project = "other".into();
    inst(h.ok(Command::CreateInstance {
        instance: Box::new(o.into()),
        idempotency_key: None,
    }));
    let other = h.sm.network_by_name("other", "default").unwrap();
    assert_eq!(other.cidr, "10.213.1.0/24");
    assert_eq!(other.vni, net.vni + 1);
}

#[test]
fn ipam_never_hands_out_an_address_twice_and_survives_a_snapshot() {
    let mut h = H::new();
    h.node("n1", false);
    h.ok(net_req("small", Some("10.9.0.0/28"), &[]));
    let mut live = BTreeSet::new();
    for round in 0..3 {
        for k in 0..6 {
            let name = format!("i{round}-{k}");
            let i = launch(&mut h, &name, |i| i.spec.network = "small".into());
            if let Ok(o) = i {
                let ip = inst(o).status.ip.unwrap();
                assert!(live.insert(ip.clone()), "{ip} handed out twice");
            }
        }
        // Full (13 addresses): the next one is refused with nothing changed.
        let full = h.sm.instances.len() >= 13;
        if full {
            let mut i = instance("overflow", 64 << 20);
            i.spec.network = "small".into();
            let e = h.err(Command::CreateInstance {
                instance: Box::new(i.into()),
                idempotency_key: None,
            });
            assert_eq!(e.field.as_deref(), Some("subnet"));
        }
        // Delete two, whose addresses become free again.
        let victims: Vec<String> =
            h.sm.instances
                .values()
                .take(2)
                .map(|i| i.meta.name.clone())
                .collect();
        for v in victims {
            let ip =
                h.sm.instance_by_name("default", &v)
                    .unwrap()
                    .status
                    .ip
                    .clone()
                    .unwrap();
            delete(&mut h, &v);
            live.remove(&ip);
        }
    }
    let alloc: BTreeSet<String> =
        h.sm.network_ips("default/small")
            .unwrap()
            .iter()
            .map(|a| std::net::Ipv4Addr::from(*a).to_string())
            .collect();
    let ips: BTreeSet<String> =
        h.sm.instances
            .values()
            .filter_map(|i| i.status.ip.clone())
            .collect();
    assert_eq!(alloc, ips);
    // The whole state (allocations included) survives a snapshot round trip.
    let bytes = serde_json::to_vec(&h.sm).unwrap();
    let back: crate::StateMachine = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(back, h.sm);
}

#[test]
fn network_bad_input_is_refused_and_changes_nothing() {
    let mut h = H::new();
    h.ok(net_req(
        "web",
        Some("10.50.0.0/16"),
        &[("a", "10.50.1.0/24"), ("b", "10.50.2.0/24")],
    ));
    let e = h.err(net_req("web2", Some("10.50.128.0/17"), &[]));
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::Conflict, Some("cidr"))
    );
    assert!(
        e.message.contains("overlaps network \"web\""),
        "{}",
        e.message
    );
    let e = h.err(net_req("tiny", Some("10.60.0.0/30"), &[]));
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::InvalidArgument, Some("cidr"))
    );
    let e = h.err(net_req("x", Some("10.60.0.0/16"), &[("s", "10.61.0.0/24")]));
    assert_eq!(e.field.as_deref(), Some("subnets[0].cidr"));
    let e = h.err(net_req("web", Some("10.70.0.0/16"), &[]));
    assert_eq!(e.code, ErrorCode::AlreadyExists);
    // Another project may not overlap either (CIDRs are unique in the cluster).
    h.ok(Command::CreateProject {
        name: "p2".into(),
        description: String::new(),
        idempotency_key: None,
    });
    let e = h.err(Command::CreateNetwork {
        project: "p2".into(),
        request: CreateNetworkRequest {
            name: "n".into(),
            cidr: Some("10.50.3.0/24".into()),
            subnets: vec![],
        },
    });
    assert_eq!(e.code, ErrorCode::Conflict);
    // Subnet choice and deletion with instances.
    h.node("n1", false);
    let a = inst(
        launch(&mut h, "a", |i| {
            i.spec.network = "web".into();
            i.spec.subnet = "b".into();
        })
        .unwrap(),
    );
    assert_eq!(a.status.ip.as_deref(), Some("10.50.2.2"));
    let e = h.err(Command::CreateInstance {
        instance: Box::new(
            {
                let mut i = instance("bad", 64 << 20);
                i.spec.network = "web".into();
                i.spec.subnet = "zzz".into();
                i
            }
            .into(),
        ),
        idempotency_key: None,
    });
    assert_eq!(e.field.as_deref(), Some("subnet"));
    let e = h.err(Command::CreateInstance {
        instance: Box::new(
            {
                let mut i = instance("bad", 64 << 20);
                i.spec.network = "nope".into();
                i
            }
            .into(),
        ),
        idempotency_key: None,
    });
    assert_eq!(e.field.as_deref(), Some("network"));
    let e = h.err(Command::DeleteNetwork {
        project: "default".into(),
        name: "web".into(),
    });
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(e.message.contains("still has 1 instance"), "{}", e.message);
    delete(&mut h, "a");
    h.ok(Command::DeleteNetwork {
        project: "default".into(),
        name: "web".into(),
    });
    assert!(h.sm.network_ips("default/web").is_none());
}

#[test]
fn security_group_rules_and_bad_input() {
    let mut h = H::new();
    let g = |o: CommandOutput| match o {
        CommandOutput::SecurityGroup(g) => *g,
        other => panic!("{other:?}"),
    };
    g(h.ok(Command::CreateSecurityGroup {
        project: "default".into(),
        request: CreateSecurityGroupRequest {
            name: "web".into(),
            description: String::new(),
        },
    }));
    let web = g(h.ok(rule("web", "tcp", Some("80-90"), Some("0.0.0.0/0"), None)));
    assert_eq!(web.rules.last().unwrap().id, "r3");
    for (c, field) in [
        (
            rule("web", "tcp", Some("90-80"), Some("0.0.0.0/0"), None),
            "ports",
        ),
        (
            rule("web", "sctp", None, Some("0.0.0.0/0"), None),
            "protocol",
        ),
        (
            rule("web", "tcp", Some("80"), None, Some("missing")),
            "group",
        ),
        (
            rule("web", "tcp", Some("80"), Some("10.0.0.1/8"), None),
            "cidr",
        ),
    ] {
        let e = h.err(c);
        assert_eq!(e.field.as_deref(), Some(field), "{e:?}");
        assert_eq!(e.code, ErrorCode::InvalidArgument);
    }
    let e = h.err(rule("web", "tcp", Some("80-90"), Some("0.0.0.0/0"), None));
    assert_eq!(e.code, ErrorCode::Conflict);
    let e = h.err(rule("nope", "tcp", None, Some("0.0.0.0/0"), None));
    assert_eq!(e.code, ErrorCode::NotFound);
    // A group used by an instance or named by another group's rule cannot go.
    h.ok(Command::CreateSecurityGroup {
        project: "default".into(),
        request: CreateSecurityGroupRequest {
            name: "db".into(),
            description: String::new(),
        },
    });
    h.ok(rule("db", "tcp", Some("5432"), None, Some("web")));
    let e = h.err(Command::DeleteSecurityGroup {
        project: "default".into(),
        name: "web".into(),
    });
    assert!(
        e.message.contains("named by a rule of group \"db\""),
        "{}",
        e.message
    );
    h.node("n1", false);
    inst(launch(&mut h, "a", |i| i.spec.security_groups = vec!["db".into()]).unwrap());
    let e = h.err(Command::DeleteSecurityGroup {
        project: "default".into(),
        name: "db".into(),
    });
    assert_eq!(e.code, ErrorCode::Conflict);
    let e = h.err(Command::CreateInstance {
        instance: Box::new(
            {
                let mut i = instance("b", 64 << 20);
                i.spec.security_groups = vec!["db".into(), "ghost".into()];
                i
            }
            .into(),
        ),
        idempotency_key: None,
    });
    assert_eq!(e.field.as_deref(), Some("security_groups[1]"));
    let after = g(h.ok(Command::DeleteSecurityGroupRule {
        project: "default".into(),
        group: "web".into(),
        rule: "r3".into(),
    }));
    assert_eq!(after.rules.len(), 2);
    let e = h.err(Command::DeleteSecurityGroupRule {
        project: "default".into(),
        group: "web".into(),
        rule: "r3".into(),
    });
    assert_eq!(e.code, ErrorCode::NotFound);
}

#[test]
fn a_host_port_is_published_once_per_node() {
    let mut h = H::new();
    h.node("n1", false);
    let port = PublishedPort {
        host_port: 8080,
        port: 80,
        protocol: Protocol::Tcp,
    };
    inst(launch(&mut h, "a", |i| i.spec.publish = vec![port]).unwrap());
    let e = h.err(Command::CreateInstance {
        instance: Box::new(
            {
                let mut i = instance("b", 64 << 20);
                i.spec.publish = vec![port];
                i
            }
            .into(),
        ),
        idempotency_key: None,
    });
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::Conflict, Some("publish"))
    );
    assert!(
        e.message
            .contains("already published on node n1 by instance default/a"),
        "{}",
        e.message
    );
    // UDP on the same port is another port.
    inst(
        launch(&mut h, "u", |i| {
            i.spec.publish = vec![PublishedPort {
                protocol: Protocol::Udp,
                ..port
            }];
        })
        .unwrap(),
    );
    // With a second node, the instance goes there.
    h.node("n2", false);
    let b = inst(launch(&mut h, "b", |i| i.spec.publish = vec![port]).unwrap());
    assert_eq!(b.status.node.as_deref(), Some("n2"));
    // Both nodes out (one for the port, one cordoned): the port is named in the 409.
    h.ok(Command::SetNodeCordon {
        name: "n1".into(),
        cordoned: true,
        version: None,
    });
    let e = h.err(Command::CreateInstance {
        instance: Box::new(
            {
                let mut i = instance("c", 64 << 20);
                i.spec.publish = vec![port];
                i
            }
            .into(),
        ),
        idempotency_key: None,
    });
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::Conflict, Some("publish"))
    );
    assert!(
        e.message
            .contains("host port 8080/tcp is already published on node"),
        "{}",
        e.message
    );
}

#[test]
fn network_map_lists_remote_endpoints_groups_and_ports() {
    let mut h = H::new();
    for (n, u) in [("n1", "10.250.0.1"), ("n2", "10.250.0.2")] {
        h.node(n, false);
        let mut node = h.sm.nodes[n].clone();
        node.underlay_ip = u.into();
        h.sm.nodes.insert(n.into(), node);
    }
    h.ok(Command::SetNodeCordon {
        name: "n2".into(),
        cordoned: true,
        version: None,
    });
    let a = inst(
        launch(&mut h, "a", |i| {
            i.spec.publish = vec![PublishedPort {
                host_port: 8080,
                port: 80,
                protocol: Protocol::Tcp,
            }];
        })
        .unwrap(),
    );
    h.ok(Command::SetNodeCordon {
        name: "n2".into(),
        cordoned: false,
        version: None,
    });
    h.ok(Command::SetNodeCordon {
        name: "n1".into(),
        cordoned: true,
        version: None,
    });
    let b = inst(launch(&mut h, "b", |_| {}).unwrap());
    assert_eq!(b.status.node.as_deref(), Some("n2"));
    let m1 = netmap::network_map(&h.sm, "n1");
    assert_eq!(m1.underlay_ip, "10.250.0.1");
    assert_eq!(m1.networks.len(), 1);
    let remote = &m1.networks[0].remote;
    assert_eq!(remote.len(), 1);
    assert_eq!(remote[0].ip, b.status.ip.clone().unwrap());
    assert_eq!(remote[0].underlay_ip, "10.250.0.2");
    assert_eq!(remote[0].mac, nimbus_api::instance_mac(&b.meta.id));
    assert_eq!(m1.instances.len(), 1);
    assert_eq!(m1.instances[0].publish.len(), 1);
    let g = &m1.security_groups[0];
    assert_eq!(g.key, "default/default");
    assert_eq!(g.members.len(), 2, "members are cluster-wide");
    assert_eq!(g.rules[0].group.as_deref(), Some("default/default"));
    let att = netmap::attachment(&h.sm, &a).unwrap();
    assert_eq!(att.bridge, format!("nimbusb{}", crate::network::FIRST_VNI));
    assert_eq!(
        (att.prefix_len, att.gateway.as_str(), att.mtu),
        (24, "10.213.0.1", 1450)
    );
    // Draining keeps the address: a private IP stays with its instance.
    h.ok(Command::SetNodeCordon {
        name: "n1".into(),
        cordoned: false,
        version: None,
    });
    let ip_before = b.status.ip.clone();
    h.ok(Command::DrainNode { name: "n2".into() });
    let b2 = h.sm.instance_by_name("default", "b").unwrap();
    assert_eq!(b2.status.node.as_deref(), Some("n1"));
    assert_eq!(b2.status.ip, ip_before);
    assert!(netmap::network_map(&h.sm, "n1").networks[0]
        .remote
        .is_empty());
}
