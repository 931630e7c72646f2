//! Node registration rules (who may register what) and node removal.

use std::collections::BTreeMap;

use nimbus_api::agent::RegisterNodeRequest;
use nimbus_api::{Capacity, ErrorCode, InstanceState, NodeCapabilities, RestartPolicy};

use crate::machine_tests::{inst, instance, H};
use crate::{Command, NodeRegistrar};

fn reg(name: &str, agent_url: &str, underlay_ip: &str) -> RegisterNodeRequest {
    RegisterNodeRequest {
        name: name.into(),
        agent_url: agent_url.into(),
        capacity: Capacity {
            cpu_millis: 2000,
            memory_bytes: 4 << 30,
            disk_bytes: 100 << 30,
        },
        capabilities: NodeCapabilities {
            containers: true,
            ..Default::default()
        },
        zone: String::new(),
        labels: BTreeMap::new(),
        agent_version: "test".into(),
        underlay_ip: underlay_ip.into(),
    }
}

fn by_token(hash: &str) -> NodeRegistrar {
    NodeRegistrar::NodeToken {
        credential_sha256: hash.into(),
    }
}

fn as_node(node: RegisterNodeRequest, by: NodeRegistrar) -> Command {
    Command::RegisterNodeAs { node, by }
}

#[test]
fn the_node_token_registers_only_nodes_without_a_credential() {
    let mut h = H::new();
    h.ok(as_node(
        reg("n1", "http://10.0.0.1:7444", "10.0.0.1"),
        by_token("h1"),
    ));
    assert_eq!(h.sm.node_credentials["n1"], "h1");
    // Another node-token holder cannot overwrite it, not even with a new credential.
    let mut evil = reg("n1", "http://10.0.0.9:7444", "10.0.0.9");
    evil.capacity.cpu_millis = 4_000_000;
    let e = h.err(as_node(evil.clone(), by_token("h2")));
    assert_eq!(e.code, ErrorCode::Conflict);
    // Nor a hollow fleet, nor a wrong credential.
    assert_eq!(
        h.err(as_node(evil.clone(), NodeRegistrar::Fleet)).code,
        ErrorCode::Conflict
    );
    let wrong = NodeRegistrar::Node {
        credential_sha256: "h2".into(),
    };
    assert_eq!(h.err(as_node(evil, wrong)).code, ErrorCode::Unauthorized);
    // Its own credential re-registers it (and keeps the credential).
    let mut again = reg("n1", "http://10.0.0.1:7445", "10.0.0.1");
    again.capacity.cpu_millis = 3000;
    let own = NodeRegistrar::Node {
        credential_sha256: "h1".into(),
    };
    h.ok(as_node(again, own));
    assert_eq!(h.sm.nodes["n1"].capacity.cpu_millis, 3000);
    assert_eq!(h.sm.node_credentials["n1"], "h1");
    // A node of an earlier build (no credential) gets one from its next registration.
    h.node("old", false);
    h.ok(as_node(
        reg("old", "http://127.0.0.1:1", ""),
        by_token("h3"),
    ));
    assert_eq!(h.sm.node_credentials["old"], "h3");
    // Hollow nodes have none and stay takeable by the fleet.
    h.ok(as_node(
        reg("hollow-0", "http://127.0.0.1:1", ""),
        NodeRegistrar::Fleet,
    ));
    h.ok(as_node(
        reg("hollow-0", "http://127.0.0.1:1", ""),
        NodeRegistrar::Fleet,
    ));
    assert!(!h.sm.node_credentials.contains_key("hollow-0"));
}

#[test]
fn registrations_are_validated() {
    let mut h = H::new();
    let cases = [
        (reg("a", "not a url", ""), "agent_url"),
        (reg("a", "ftp://10.0.0.1", ""), "agent_url"),
        (reg("a", "http://", ""), "agent_url"),
        (reg("a", "http://10.0.0.1:7444", "nope"), "underlay_ip"),
        (reg("A!", "http://10.0.0.1:7444", ""), "name"),
    ];
    for (r, field) in cases {
        let e = h.err(as_node(r, by_token("h")));
        assert_eq!(e.field.as_deref(), Some(field), "{e:?}");
    }
    let mut big = reg("a", "http://10.0.0.1:7444", "");
    big.capacity.cpu_millis = 1_000_000_000;
    assert_eq!(
        h.err(as_node(big, by_token("h"))).field.as_deref(),
        Some("capacity.cpu_millis")
    );
    for memory in [0, (64 << 40) + 1] {
        let mut m = reg("a", "http://10.0.0.1:7444", "");
        m.capacity.memory_bytes = memory;
        assert_eq!(
            h.err(as_node(m, by_token("h"))).field.as_deref(),
            Some("capacity.memory_bytes")
        );
    }
    // The limits themselves are fine.
    let mut max = reg("a", "HTTPS://10.0.0.1:7444/x", "");
    max.capacity.cpu_millis = 4096 * 1000;
    max.capacity.memory_bytes = 64 << 40;
    h.ok(as_node(max, by_token("h")));
}

#[test]
fn an_underlay_address_belongs_to_one_machine() {
    let mut h = H::new();
    h.ok(as_node(
        reg("n1", "http://10.0.0.1:7444", "10.0.0.1"),
        by_token("h1"),
    ));
    // Another machine claiming it.
    let e = h.err(as_node(
        reg("n2", "http://10.0.0.2:7444", "10.0.0.1"),
        by_token("h2"),
    ));
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::Conflict, Some("underlay_ip"))
    );
    // A second agent on the same machine (tests run several) shares it.
    h.ok(as_node(
        reg("n2", "http://10.0.0.1:7445", "10.0.0.1"),
        by_token("h2"),
    ));
}

#[test]
fn removal_is_refused_with_instances_unless_forced_and_fences_the_node() {
    let mut h = H::new();
    h.ok(as_node(
        reg("n1", "http://10.0.0.1:7444", ""),
        by_token("h1"),
    ));
    let mut moves = instance("moves", 1 << 20);
    moves.spec.restart = RestartPolicy::Always;
    let moves = inst(h.ok(Command::CreateInstance {
        instance: Box::new(moves.into()),
        idempotency_key: None,
    }));
    let stays = inst(h.create("stays", 1 << 20, None).unwrap());
    assert_eq!(moves.status.node.as_deref(), Some("n1"));
    h.ok(as_node(
        reg("n2", "http://10.0.0.2:7444", ""),
        by_token("h2"),
    ));

    let e = h.err(Command::RemoveNode {
        name: "n1".into(),
        force: false,
    });
    assert_eq!(e.code, ErrorCode::Conflict);
    assert_eq!(
        h.err(Command::RemoveNode {
            name: "nope".into(),
            force: true,
        })
        .code,
        ErrorCode::NotFound
    );

    h.ok(Command::RemoveNode {
        name: "n1".into(),
        force: true,
    });
    assert!(!h.sm.nodes.contains_key("n1"));
    assert!(!h.sm.node_credentials.contains_key("n1"));
    let moved = &h.sm.instances[&moves.meta.id];
    assert_eq!(moved.status.node.as_deref(), Some("n2"));
    let failed = &h.sm.instances[&stays.meta.id];
    assert_eq!(failed.status.node, None);
    assert_eq!(failed.status.state, InstanceState::Failed);
    assert_eq!(h.sm.instances_on("n1").count(), 0);
    // Its credential died with it: it cannot re-register with it...
    let own = NodeRegistrar::Node {
        credential_sha256: "h1".into(),
    };
    assert_eq!(
        h.err(as_node(reg("n1", "http://10.0.0.1:7444", ""), own))
            .code,
        ErrorCode::Unauthorized
    );
    // ...but may register anew (node token), as a new node.
    h.ok(as_node(
        reg("n1", "http://10.0.0.1:7444", ""),
        by_token("h9"),
    ));
    assert_eq!(h.sm.node_credentials["n1"], "h9");
    // An empty node goes without force.
    h.ok(Command::RemoveNode {
        name: "n1".into(),
        force: false,
    });
}

#[test]
fn a_certificate_registers_its_node_unless_revoked() {
    let mut h = H::new();
    h.ok(as_node(
        reg("c1", "https://10.0.0.5:7444", "10.0.0.5"),
        NodeRegistrar::Certificate,
    ));
    assert!(h.sm.nodes.contains_key("c1"));
    assert!(
        !h.sm.node_credentials.contains_key("c1"),
        "no bearer credential issued"
    );
    h.ok(Command::Pki(crate::pki::PkiCommand::Revoke {
        node: "c1".into(),
        now: 1,
    }));
    let e = h.err(as_node(
        reg("c1", "https://10.0.0.5:7444", "10.0.0.5"),
        NodeRegistrar::Certificate,
    ));
    assert_eq!(e.code, ErrorCode::Unauthorized);
}
