//! Unit tests of load balancers in the state machine.

use std::collections::BTreeMap;

use nimbus_api::agent::InstanceReport;
use nimbus_api::lb::{
    LbBackendHealth, LbBackends, LbInstanceRef, LbListener, LbProtocol, LoadBalancerSpec,
};
use nimbus_api::{ErrorCode, InstanceState};

use crate::machine_tests::{inst, instance, H};
use crate::{Command, CommandOutput};

/// An HTTP listener on `port` to backend port 8080, round robin, nothing else set.
pub(crate) fn spec(port: u32, backends: LbBackends) -> LoadBalancerSpec {
    LoadBalancerSpec {
        listeners: vec![LbListener {
            port,
            protocol: LbProtocol::Http,
            target_port: Some(8080),
        }],
        backends,
        algorithm: "round_robin".into(),
        hash_header: None,
        health_check: None,
        routes: vec![],
        sticky_cookie: None,
        tls: None,
        cache: false,
        vip: None,
        vip_nodes: vec![],
        nodes: vec![],
        replicas: None,
    }
}

fn label(l: &str) -> LbBackends {
    LbBackends {
        label: Some(l.into()),
        ..LbBackends::default()
    }
}

fn create(name: &str, s: LoadBalancerSpec) -> Command {
    Command::CreateLoadBalancer {
        project: "default".into(),
        name: name.into(),
        spec: Box::new(s),
        labels: BTreeMap::new(),
    }
}

/// A running instance with a label and a spread group.
fn running(h: &mut H, name: &str, app: &str) -> String {
    let mut i = instance(name, 64 << 20);
    i.meta.labels.insert("app".into(), app.into());
    i.spec.spread_group = Some(format!("{app}-group"));
    let i = inst(h.ok(Command::CreateInstance {
        instance: Box::new(i.into()),
        idempotency_key: None,
    }));
    h.ok(Command::ReportStatus {
        node: i.status.node.clone().unwrap(),
        reports: vec![InstanceReport {
            id: i.meta.id.clone(),
            generation: i.status.generation,
            state: InstanceState::Running,
            pid: Some(1),
            exit_code: None,
            message: String::new(),
            restart_count: 0,
            accelerator: None,
            deleted: false,
        }],
        interfaces: vec![],
    });
    i.meta.id
}

#[test]
fn create_resolve_conflicts_and_bad_inputs() {
    let mut h = H::new();
    h.node("n1", false);
    h.node("n2", false);
    running(&mut h, "web1", "web");
    running(&mut h, "web2", "web");
    running(&mut h, "db1", "db");
    let rev = h.sm.assignment_revision("n2");
    let out = h.ok(create("web", spec(80, label("app=web"))));
    let CommandOutput::LoadBalancer(lb) = out else {
        panic!("expected a load balancer")
    };
    assert_eq!(lb.status.nodes, ["n1", "n2"]);
    assert!(
        h.sm.assignment_revision("n2") > rev,
        "every node re-reads its LBs"
    );
    let a = h.sm.lb_assignments("n1");
    assert_eq!(a.len(), 1);
    let names: Vec<&str> = a[0].backends.iter().map(|b| b.instance.as_str()).collect();
    assert_eq!(names, ["web1", "web2"]);
    assert!(a[0].backends.iter().all(|b| b.ip.starts_with("10.")));

    // Port already used (same port, TCP-based) -> 409, nothing changes.
    let e = h.err(create("web-b", spec(80, label("app=web"))));
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(e.field.as_deref(), Some("listeners[0].port"));
    // UDP on the same port number is fine.
    let mut udp = spec(80, label("app=web"));
    udp.listeners[0].protocol = LbProtocol::Udp;
    h.ok(create("dns", udp));
    // Group that does not exist -> 422.
    let e = h.err(create(
        "g",
        spec(
            81,
            LbBackends {
                group: Some("nope".into()),
                ..LbBackends::default()
            },
        ),
    ));
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    assert_eq!(e.field.as_deref(), Some("backends.group"));
    h.ok(create(
        "g",
        spec(
            81,
            LbBackends {
                group: Some("db-group".into()),
                ..LbBackends::default()
            },
        ),
    ));
    // Unknown explicit instance -> 422.
    let e = h.err(create(
        "x",
        spec(
            82,
            LbBackends {
                instances: vec![LbInstanceRef {
                    name: "ghost".into(),
                    weight: 1,
                }],
                ..LbBackends::default()
            },
        ),
    ));
    assert_eq!(e.field.as_deref(), Some("backends.instances[0].name"));
    // Duplicate name -> 409.
    let e = h.err(create("web", spec(83, label("app=web"))));
    assert_eq!(e.code, ErrorCode::AlreadyExists);
    // The project cannot be deleted while it has LBs.
    let e = h.err(Command::DeleteProject {
        name: "default".into(),
    });
    assert_eq!(e.code, ErrorCode::Conflict);
}

#[test]
fn update_delete_health_and_instance_changes() {
    let mut h = H::new();
    h.node("n1", false);
    let web1 = running(&mut h, "web1", "web");
    h.ok(create("web", spec(80, label("app=web"))));
    // Update with a stale version is refused.
    let e = h.err(Command::UpdateLoadBalancer {
        project: "default".into(),
        name: "web".into(),
        spec: Box::new(spec(8080, label("app=web"))),
        version: Some(7),
    });
    assert_eq!(e.code, ErrorCode::VersionConflict);
    h.ok(Command::UpdateLoadBalancer {
        project: "default".into(),
        name: "web".into(),
        spec: Box::new(spec(8080, label("app=web"))),
        version: Some(1),
    });
    assert_eq!(
        h.sm.loadbalancer("default", "web").unwrap().spec.listeners[0].port,
        8080
    );
    // Health reports land in the status, per node.
    let mut reports = BTreeMap::new();
    let id = h.sm.loadbalancer("default", "web").unwrap().meta.id.clone();
    reports.insert(
        id,
        vec![LbBackendHealth {
            instance: "web1".into(),
            address: "10.0.0.2:8080".into(),
            healthy: false,
            node: String::new(),
        }],
    );
    h.ok(Command::ReportLbHealth {
        node: "n1".into(),
        reports,
    });
    let st = &h.sm.loadbalancer("default", "web").unwrap().status.backends;
    assert_eq!(st.len(), 1);
    assert_eq!((st[0].node.as_str(), st[0].healthy), ("n1", false));
    // A new running instance with the label joins; the node's revision moves.
    let rev = h.sm.assignment_revision("n1");
    running(&mut h, "web2", "web");
    assert!(h.sm.assignment_revision("n1") > rev);
    assert_eq!(h.sm.lb_assignments("n1")[0].backends.len(), 2);
    // A stopped instance leaves the backend set.
    h.ok(Command::SetInstanceDesired {
        project: "default".into(),
        name: "web1".into(),
        action: crate::InstanceAction::Stop,
        version: None,
    });
    let node = h.sm.instances[&web1].status.node.clone().unwrap();
    let generation = h.sm.instances[&web1].status.generation;
    h.ok(Command::ReportStatus {
        node,
        reports: vec![InstanceReport {
            id: web1.clone(),
            generation,
            state: InstanceState::Stopped,
            pid: None,
            exit_code: Some(0),
            message: String::new(),
            restart_count: 0,
            accelerator: None,
            deleted: false,
        }],
        interfaces: vec![],
    });
    let names: Vec<String> = h.sm.lb_assignments("n1")[0]
        .backends
        .iter()
        .map(|b| b.instance.clone())
        .collect();
    assert_eq!(names, ["web2"]);
    h.ok(Command::DeleteLoadBalancer {
        project: "default".into(),
        name: "web".into(),
    });
    assert!(h.sm.lb_assignments("n1").is_empty());
    let e = h.err(Command::DeleteLoadBalancer {
        project: "default".into(),
        name: "web".into(),
    });
    assert_eq!(e.code, ErrorCode::NotFound);
}

fn lease(node: &str, vip: &str, release: bool) -> Command {
    Command::VipLease {
        node: node.into(),
        project: "default".into(),
        name: "web".into(),
        vip: vip.into(),
        release,
    }
}

fn held(r: crate::CommandResult) -> bool {
    match r {
        Ok(CommandOutput::VipLease(l)) => l.held,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn vip_lease_acquire_renew_expire_move_release() {
    let mut h = H::new();
    h.node("n1", false);
    h.node("n2", false);
    h.node("n3", false);
    running(&mut h, "web1", "web");
    let mut s = spec(80, label("app=web"));
    s.vip = Some("10.9.0.50".into());
    s.vip_nodes = vec!["n1".into(), "n2".into()];
    h.ok(create("web", s.clone()));
    // Another LB cannot use the same VIP; nothing changes.
    let mut other = spec(81, label("app=web"));
    other.vip = Some("10.9.0.50".into());
    let e = h.err(create("other", other));
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(e.field.as_deref(), Some("vip"));

    let at = |s: &str| format!("2026-01-01T00:01:{s}Z");
    assert!(held(
        h.run_at(&at("00.000"), lease("n1", "10.9.0.50", false))
    ));
    let lb = h.sm.loadbalancer("default", "web").unwrap().clone();
    let cur = lb.status.vip.clone().unwrap();
    assert_eq!(cur.holder.as_deref(), Some("n1"));
    assert_eq!(cur.expires_at, "2026-01-01T00:01:01.500Z");
    assert!(h.sm.events.iter().any(|e| e.reason == "VipAcquired"));
    // n2 is refused while the lease lives (state unchanged); n3 is no VIP node.
    let before = h.sm.clone();
    let e = h
        .run_at(&at("01.000"), lease("n2", "10.9.0.50", false))
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict);
    assert!(e.message.contains("held by node n1"), "{}", e.message);
    assert_eq!(before.loadbalancers, h.sm.loadbalancers);
    assert!(h
        .run_at(&at("01.000"), lease("n3", "10.9.0.50", false))
        .is_err());
    assert!(!h.sm.vip_lease_refused("default", "web", "n1", 0));
    // A stale VIP (the agent acting on an old spec) is refused.
    assert!(h
        .run_at(&at("01.000"), lease("n1", "10.9.0.51", false))
        .is_err());
    // n1 renews: expiry moves.
    assert!(held(
        h.run_at(&at("01.200"), lease("n1", "10.9.0.50", false))
    ));
    assert!(h
        .sm
        .vip_lease_refused("default", "web", "n2", 1_767_225_662_000));
    assert!(h
        .run_at(&at("02.600"), lease("n2", "10.9.0.50", false))
        .is_err());
    // n1 stops renewing: at expiry n2 takes it.
    assert!(held(
        h.run_at(&at("02.700"), lease("n2", "10.9.0.50", false))
    ));
    let cur =
        h.sm.loadbalancer("default", "web")
            .unwrap()
            .status
            .vip
            .clone()
            .unwrap();
    assert_eq!(cur.holder.as_deref(), Some("n2"));
    assert!(h
        .sm
        .events
        .iter()
        .any(|e| e.reason == "VipMoved" && e.message.contains("from n1 to n2")));
    // n1 comes back: refused, and its release does not touch n2's lease.
    assert!(h
        .run_at(&at("03.000"), lease("n1", "10.9.0.50", false))
        .is_err());
    assert!(!held(
        h.run_at(&at("03.000"), lease("n1", "10.9.0.50", true))
    ));
    assert_eq!(
        h.sm.loadbalancer("default", "web")
            .unwrap()
            .status
            .vip
            .as_ref()
            .unwrap()
            .holder
            .as_deref(),
        Some("n2")
    );
    // A holder marked down loses it at once.
    h.ok(Command::MarkNodeDown {
        name: "n2".into(),
        reason: "test".into(),
    });
    assert!(held(
        h.run_at(&at("03.100"), lease("n1", "10.9.0.50", false))
    ));
    // Release by the holder frees it for anyone.
    assert!(!held(
        h.run_at(&at("03.200"), lease("n1", "10.9.0.50", true))
    ));
    assert!(h.sm.events.iter().any(|e| e.reason == "VipReleased"));
    assert!(h
        .sm
        .loadbalancer("default", "web")
        .unwrap()
        .status
        .vip
        .as_ref()
        .unwrap()
        .holder
        .is_none());
    // Changing the VIP voids the lease.
    assert!(held(
        h.run_at(&at("03.300"), lease("n1", "10.9.0.50", false))
    ));
    s.vip = Some("10.9.0.60".into());
    h.ok(Command::UpdateLoadBalancer {
        project: "default".into(),
        name: "web".into(),
        spec: Box::new(s),
        version: None,
    });
    assert!(h
        .sm
        .loadbalancer("default", "web")
        .unwrap()
        .status
        .vip
        .is_none());
}

#[test]
fn placement_replicas_follow_nodes_and_gate_assignments_and_vip() {
    let mut h = H::new();
    for n in ["n1", "n2", "n3"] {
        h.node(n, false);
    }
    running(&mut h, "web1", "web");
    // Unset: every ready node serves it.
    h.ok(create("all", spec(81, label("app=web"))));
    assert_eq!(
        h.sm.loadbalancer("default", "all").unwrap().status.nodes,
        ["n1", "n2", "n3"]
    );
    // An unknown node is refused, and nothing is created.
    let mut s = spec(80, label("app=web"));
    s.nodes = vec!["n1".into(), "nope".into()];
    let e = h.err(create("web", s.clone()));
    assert_eq!(e.field.as_deref(), Some("nodes[1]"));
    assert!(h.sm.loadbalancer("default", "web").is_none());
    // One replica among n2, n3.
    s.nodes = vec!["n2".into(), "n3".into()];
    s.replicas = Some(1);
    s.vip = Some("10.9.0.70".into());
    h.ok(create("web", s));
    let first =
        h.sm.loadbalancer("default", "web")
            .unwrap()
            .status
            .nodes
            .clone();
    assert_eq!(first.len(), 1);
    assert_ne!(first[0], "n1");
    let serves = |h: &H, n: &str| h.sm.lb_assignments(n).iter().any(|a| a.name == "web");
    for n in ["n1", "n2", "n3"] {
        assert_eq!(serves(&h, n), first[0] == n, "{n}");
        assert_eq!(h.sm.lb_assignments(n).len(), usize::from(serves(&h, n)) + 1);
    }
    // Only the serving node can take the VIP.
    let other = if first[0] == "n2" { "n3" } else { "n2" };
    let vip = |n: &str| Command::VipLease {
        node: n.into(),
        project: "default".into(),
        name: "web".into(),
        vip: "10.9.0.70".into(),
        release: false,
    };
    let e = h.err(vip(other));
    assert!(e.message.contains("does not serve"), "{}", e.message);
    assert!(held(h.run(vip(&first[0]))));
    // The chosen node goes down: the other one is chosen, gets a new assignment revision and
    // the VIP lease can move to it at once.
    let rev = h.sm.assignment_revision(other);
    h.ok(Command::MarkNodeDown {
        name: first[0].clone(),
        reason: "test".into(),
    });
    assert_eq!(
        h.sm.loadbalancer("default", "web").unwrap().status.nodes,
        [other]
    );
    assert!(h.sm.assignment_revision(other) > rev);
    assert!(serves(&h, other));
    assert!(held(h.run(vip(other))));
    assert!(!h.sm.vip_lease_refused("default", "web", other, 0));
}

#[test]
fn a_stopped_backend_drains_out_of_its_lbs_before_its_node_stops_it() {
    let mut h = H::new();
    h.node("n1", false);
    h.node("n2", false);
    let id = running(&mut h, "web1", "web");
    running(&mut h, "web2", "web");
    let lone = running(&mut h, "db1", "db");
    h.ok(create("web", spec(80, label("app=web"))));
    let node = h.sm.instances[&id].status.node.clone().unwrap();
    let asg = |h: &H, id: &str| {
        crate::netmap::assignments_of(&h.sm, &node, false)
            .assignments
            .into_iter()
            .find(|a| a.id == id)
    };
    h.ok(Command::SetInstanceDesired {
        project: "default".into(),
        name: "web1".into(),
        action: crate::InstanceAction::Stop,
        version: None,
    });
    let d = h.sm.drains[&id].clone();
    assert_eq!(d.since, h.sm.revision);
    assert_eq!(d.nodes, ["n1", "n2"]);
    // Out of rotation at once, on every LB node...
    for n in ["n1", "n2"] {
        let names: Vec<String> = h.sm.lb_assignments(n)[0]
            .backends
            .iter()
            .map(|b| b.instance.clone())
            .collect();
        assert_eq!(names, ["web2"], "{n}");
        assert_eq!(h.sm.assignment_revision(n), h.sm.revision, "{n} woken");
    }
    // ...while its own node keeps it running, and its reports do not put it back.
    assert_eq!(
        asg(&h, &id).unwrap().desired,
        nimbus_api::DesiredState::Running
    );
    let gen = h.sm.instances[&id].status.generation;
    h.ok(Command::ReportStatus {
        node: node.clone(),
        reports: vec![InstanceReport {
            id: id.clone(),
            generation: gen,
            state: InstanceState::Running,
            pid: Some(7),
            exit_code: None,
            message: String::new(),
            restart_count: 0,
            accelerator: None,
            deleted: false,
        }],
        interfaces: vec![],
    });
    assert_eq!(h.sm.instances[&id].status.state, InstanceState::Stopping);
    h.ok(Command::FinishDrain {
        ids: vec![id.clone()],
    });
    assert!(h.sm.drains.is_empty());
    assert_eq!(
        asg(&h, &id).unwrap().desired,
        nimbus_api::DesiredState::Stopped
    );
    assert_eq!(h.sm.assignment_revision(&node), h.sm.revision);
    // An instance no LB sends traffic to stops at once.
    h.ok(Command::SetInstanceDesired {
        project: "default".into(),
        name: "db1".into(),
        action: crate::InstanceAction::Delete,
        version: None,
    });
    assert!(!h.sm.drains.contains_key(&lone));
    // Starting it again ends a drain; a drain of a deleted instance is forgotten.
    h.ok(Command::SetInstanceDesired {
        project: "default".into(),
        name: "web2".into(),
        action: crate::InstanceAction::Stop,
        version: None,
    });
    assert_eq!(h.sm.drains.len(), 1);
    h.ok(Command::SetInstanceDesired {
        project: "default".into(),
        name: "web2".into(),
        action: crate::InstanceAction::Start,
        version: None,
    });
    assert!(h.sm.drains.is_empty());
}
