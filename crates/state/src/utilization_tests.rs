//! Unit tests of measured utilisation and the adaptive weights in the state machine
//! (`utilization.rs`).

use nimbus_api::NodeUtilization;

use crate::machine_tests::{inst, instance, H};
use crate::Command;

const GIB: u64 = 1 << 30;

fn measured(network_permille: u32) -> NodeUtilization {
    NodeUtilization {
        cpu_permille: 50,
        memory_permille: 100,
        network_permille,
        network_mbps: 1000,
    }
}

/// Both nodes' measurements in one leader snapshot, `secs` into the minute.
fn round(h: &mut H, secs: u32, n1: u32, n2: u32) {
    let at = format!("2026-01-01T00:{:02}:{:02}Z", secs / 60, secs % 60);
    h.run_at(
        &at,
        Command::UtilizationSnapshot {
            nodes: [("n1".into(), measured(n1)), ("n2".into(), measured(n2))].into(),
        },
    )
    .expect("snapshot");
}

fn probe(h: &mut H, name: &str) -> String {
    let mut i = instance(name, 256 << 20);
    i.spec.cpus = 0.1;
    let out = h
        .run(Command::CreateInstance {
            instance: Box::new(i.into()),
            idempotency_key: None,
        })
        .expect("create");
    inst(out).status.node.expect("placed")
}

#[test]
fn measured_network_pressure_moves_the_weights_and_the_placements() {
    let mut h = H::new();
    h.node("n1", false);
    h.node("n2", false);
    // n1 holds a 2 GiB instance: more reserved CPU and memory than the empty n2.
    h.ok(Command::SetNodeCordon {
        name: "n2".into(),
        cordoned: true,
        version: None,
    });
    h.create("base", 2 * GIB, None).unwrap();
    h.ok(Command::SetNodeCordon {
        name: "n2".into(),
        cordoned: false,
        version: None,
    });
    // The measurement is stored on the node.
    round(&mut h, 0, 0, 900);
    let u = h.sm.nodes["n2"].utilization.expect("utilization stored");
    assert_eq!(u.network_permille, 900);
    assert_eq!(u.network_mbps, 1000);
    let nodes = crate::placement::nodes(&h.sm, None);
    let n2 = nodes.iter().find(|n| n.name == "n2").unwrap();
    assert!((n2.measured.network - 0.9).abs() < 1e-9);
    assert_eq!(n2.network_mbps, 1000);
    // Network pressure (0 + 0.9) / 2 is below the boost threshold: base weights, and the
    // less reserved n2 wins despite its busy network.
    let w = h.sm.score_weights();
    assert!((w.network - 0.2).abs() < 1e-9, "{w:?}");
    assert_eq!(probe(&mut h, "p1"), "n2");
    // A network surge on both nodes: pressure 0.775 >= 0.75 boosts the network weight,
    // one controller step per 5 s of log time.
    let mut last = w.network;
    for k in 1..=6 {
        round(&mut h, 10 * k, 600, 950);
        // A heartbeat 1 s later does not step the controller again.
        round(&mut h, 10 * k + 1, 600, 950);
        let w = h.sm.score_weights();
        assert!(w.network > last, "step {k}: {w:?}");
        last = w.network;
    }
    assert!((last - 0.8).abs() < 0.02, "{last}");
    let boosted: Vec<_> =
        h.sm.events
            .iter()
            .filter(|e| e.reason == "WeightsAdapted")
            .collect();
    assert_eq!(boosted.len(), 1, "{boosted:?}");
    assert!(
        boosted[0].message.contains("boosted: network (was none)"),
        "{}",
        boosted[0].message
    );
    // Now network dominates: the quiet-network n1 wins although it has more reserved.
    assert_eq!(probe(&mut h, "p2"), "n1");
    // Hysteresis: pressure 0.65 (between low 0.55 and high 0.75) keeps the boost.
    round(&mut h, 200, 350, 950);
    assert!(h.sm.score_weights().network >= last - 1e-9);
    // Below low: the weight decays back towards 0.2 and the boost is released.
    for k in 0..12 {
        round(&mut h, 300 + 10 * k, 100, 100);
    }
    let w = h.sm.score_weights();
    assert!((w.network - 0.2).abs() < 0.02, "{w:?}");
    assert_eq!(
        h.sm.events
            .iter()
            .filter(|e| e.reason == "WeightsAdapted")
            .count(),
        2
    );
    // Replaying the same log gives the same state (the controller is deterministic).
    let json = serde_json::to_string(&h.sm).unwrap();
    let back: crate::StateMachine = serde_json::from_str(&json).unwrap();
    assert_eq!(back, h.sm);
}

#[test]
fn a_snapshot_without_a_node_keeps_its_last_measurement() {
    let mut h = H::new();
    h.node("n1", false);
    h.node("n2", false);
    round(&mut h, 0, 300, 100);
    h.run_at(
        "2026-01-01T00:00:30Z",
        Command::UtilizationSnapshot {
            nodes: [("n2".into(), measured(200)), ("gone".into(), measured(1))].into(),
        },
    )
    .unwrap();
    assert_eq!(
        h.sm.nodes["n1"].utilization.map(|u| u.network_permille),
        Some(300)
    );
    assert_eq!(
        h.sm.nodes["n2"].utilization.map(|u| u.network_permille),
        Some(200)
    );
    assert!(!h.sm.nodes.contains_key("gone"));
}
