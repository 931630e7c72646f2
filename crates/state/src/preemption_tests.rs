//! Unit tests of preemption executed by the state machine (`preemption.rs`).

use nimbus_api::agent::InstanceReport;
use nimbus_api::{DesiredState, ErrorCode, Instance, InstanceState};

use crate::machine_tests::{inst, instance, H};
use crate::{Command, CommandResult, InstanceAction};

const GIB: u64 = 1 << 30;

/// Creates instance `name` with `mem` bytes and priority `priority` (what the API resolves a
/// priority class to).
fn create(h: &mut H, name: &str, mem: u64, priority: i32) -> CommandResult {
    let mut i = instance(name, mem);
    i.spec.cpus = 0.1;
    i.spec.priority = priority;
    h.run(Command::CreateInstance {
        instance: Box::new(i.into()),
        idempotency_key: None,
    })
}

fn get(h: &H, name: &str) -> Instance {
    h.sm.instance_by_name("default", name)
        .unwrap_or_else(|| panic!("no instance {name}"))
        .clone()
}

fn events(h: &H, name: &str, reason: &str) -> Vec<String> {
    h.sm.events
        .iter()
        .filter(|e| e.name == name && e.reason == reason)
        .map(|e| e.message.clone())
        .collect()
}

/// The memory reserved on `node` according to the scheduler's view.
fn reserved_memory(h: &H, node: &str) -> u64 {
    crate::placement::node_views(&h.sm, None)
        .into_iter()
        .find(|v| v.name == node)
        .map_or(0, |v| v.allocated.memory_bytes)
}

#[test]
fn a_higher_priority_create_evicts_the_minimal_set_on_one_node() {
    let mut h = H::new();
    h.node("n1", false); // 4 GiB of memory
    create(&mut h, "a", GIB, -100).unwrap();
    create(&mut h, "b", GIB, -100).unwrap();
    let c = inst(create(&mut h, "c", 2 * GIB, 0).unwrap());
    let rev = h.sm.assignment_revision("n1");
    // 2 GiB more fit nowhere. Evicting {c} (one victim) beats {a, b} (two).
    let hi = inst(create(&mut h, "hi", 2 * GIB, 100).unwrap());
    assert_eq!(hi.status.node.as_deref(), Some("n1"));
    assert_eq!(hi.status.state, InstanceState::Scheduled);
    let c2 = get(&h, "c");
    assert_eq!(c2.spec.desired, DesiredState::Stopped);
    assert_eq!(c2.status.state, InstanceState::Stopped);
    assert_eq!(c2.status.node, None);
    // The victim keeps its network address (IPAM is per network, not per node).
    assert_eq!(c2.status.ip, c.status.ip);
    assert!(
        c2.status
            .message
            .contains("preempted by default/hi (priority 100 > 0)"),
        "{}",
        c2.status.message
    );
    assert!(c2.meta.version > c.meta.version);
    assert!(hi.status.ip.is_some());
    assert_ne!(hi.status.ip, c.status.ip);
    for other in ["a", "b"] {
        let i = get(&h, other);
        assert_eq!(i.spec.desired, DesiredState::Running, "{other}");
        assert_eq!(i.status.node.as_deref(), Some("n1"), "{other}");
    }
    assert_eq!(reserved_memory(&h, "n1"), 4 * GIB);
    assert!(h.sm.assignment_revision("n1") > rev);
    assert_eq!(h.sm.instances_on("n1").count(), 3);
    let preempted = events(&h, "c", "Preempted");
    assert_eq!(preempted.len(), 1);
    assert!(preempted[0].contains("node n1"), "{preempted:?}");
    let scheduled = events(&h, "hi", "Scheduled");
    assert_eq!(
        scheduled,
        vec!["placed on node n1 after preempting default/c".to_owned()]
    );
}

#[test]
fn the_lowest_priority_victims_are_chosen() {
    let mut h = H::new();
    h.node("n1", false);
    create(&mut h, "normal", 2 * GIB, 0).unwrap();
    create(&mut h, "low", 2 * GIB, -100).unwrap();
    create(&mut h, "hi", 2 * GIB, 100).unwrap();
    assert_eq!(get(&h, "low").status.state, InstanceState::Stopped);
    assert_eq!(get(&h, "normal").status.node.as_deref(), Some("n1"));
}

#[test]
fn the_freed_node_is_the_one_with_the_smallest_victim_set() {
    let mut h = H::new();
    h.node("n1", false);
    h.node("n2", false);
    // n1: four 1 GiB instances (full); n2: one 3 GiB instance (1 GiB free).
    let cordon = |h: &mut H, name: &str, cordoned: bool| {
        h.run(Command::SetNodeCordon {
            name: name.into(),
            cordoned,
            version: None,
        })
        .unwrap();
    };
    cordon(&mut h, "n2", true);
    for k in 0..4 {
        create(&mut h, &format!("s{k}"), GIB, -100).unwrap();
    }
    cordon(&mut h, "n2", false);
    cordon(&mut h, "n1", true);
    create(&mut h, "big", 3 * GIB, -100).unwrap();
    cordon(&mut h, "n1", false);
    assert_eq!(get(&h, "big").status.node.as_deref(), Some("n2"));
    // 2 GiB fits nowhere: two victims on n1, one (big) on n2.
    let hi = inst(create(&mut h, "hi", 2 * GIB, 100).unwrap());
    assert_eq!(hi.status.node.as_deref(), Some("n2"));
    let stopped: Vec<String> =
        h.sm.instances
            .values()
            .filter(|i| i.status.state == InstanceState::Stopped)
            .map(|i| i.meta.name.clone())
            .collect();
    assert_eq!(stopped, vec!["big".to_owned()], "exactly one victim");
    assert_eq!(h.sm.instances_on("n1").count(), 4);
}

#[test]
fn equal_priority_never_preempts_and_a_refusal_changes_nothing() {
    let mut h = H::new();
    h.node("n1", false);
    create(&mut h, "a", 2 * GIB, 0).unwrap();
    create(&mut h, "b", 2 * GIB, 0).unwrap();
    let mut same = instance("same", 2 * GIB);
    same.spec.priority = 0;
    let e = h.err(Command::CreateInstance {
        instance: Box::new(same.into()),
        idempotency_key: None,
    });
    assert_eq!(e.code, ErrorCode::Unschedulable);
    assert!(e.message.contains("insufficient memory"), "{}", e.message);
    // Higher priority, but more than evicting every lower one could free: still refused.
    let mut huge = instance("huge", 8 * GIB);
    huge.spec.priority = 1000;
    let e = h.err(Command::CreateInstance {
        instance: Box::new(huge.into()),
        idempotency_key: None,
    });
    assert_eq!(e.code, ErrorCode::Unschedulable);
}

#[test]
fn reports_from_the_old_node_are_ignored_and_start_places_it_again() {
    let mut h = H::new();
    h.node("n1", false);
    let c = inst(create(&mut h, "c", 3 * GIB, 0).unwrap());
    let hi = inst(create(&mut h, "hi", 2 * GIB, 100).unwrap());
    // The agent's last word on the victim (old generation on the old node) changes nothing.
    h.ok(Command::ReportStatus {
        node: "n1".into(),
        reports: vec![InstanceReport {
            id: c.meta.id.clone(),
            generation: c.status.generation,
            state: InstanceState::Running,
            pid: Some(42),
            exit_code: None,
            message: String::new(),
            restart_count: 0,
            accelerator: None,
            deleted: false,
        }],
        interfaces: Vec::new(),
    });
    assert_eq!(get(&h, "c").status.state, InstanceState::Stopped);
    assert_eq!(get(&h, "c").status.pid, None);
    // No room while hi runs: starting c is refused (its priority is lower) and changes nothing.
    let e = h.err(Command::SetInstanceDesired {
        project: "default".into(),
        name: "c".into(),
        action: InstanceAction::Start,
        version: None,
    });
    assert_eq!(e.code, ErrorCode::Unschedulable);
    // hi is deleted (the agent confirms); starting c places it again with a new generation.
    h.ok(Command::SetInstanceDesired {
        project: "default".into(),
        name: "hi".into(),
        action: InstanceAction::Delete,
        version: None,
    });
    h.ok(Command::ReportStatus {
        node: "n1".into(),
        reports: vec![InstanceReport {
            id: hi.meta.id.clone(),
            generation: hi.status.generation,
            state: InstanceState::Stopped,
            pid: None,
            exit_code: None,
            message: String::new(),
            restart_count: 0,
            accelerator: None,
            deleted: true,
        }],
        interfaces: Vec::new(),
    });
    let started = inst(h.ok(Command::SetInstanceDesired {
        project: "default".into(),
        name: "c".into(),
        action: InstanceAction::Start,
        version: None,
    }));
    assert_eq!(started.status.node.as_deref(), Some("n1"));
    assert_eq!(started.spec.desired, DesiredState::Running);
    assert_eq!(started.status.state, InstanceState::Scheduled);
    assert!(started.status.generation > c.status.generation);
    assert!(started.status.ip.is_some());
}
