//! Unit tests of VM creates waiting for a node's accelerator probe (`vm_probe.rs`).

use std::collections::BTreeMap;

use nimbus_api::agent::RegisterNodeRequest;
use nimbus_api::{Capacity, ErrorCode, Instance, InstanceState, InstanceType, NodeCapabilities};

use crate::machine_tests::{inst, instance, H};
use crate::{Command, CommandResult, InstanceAction};

const GIB: u64 = 1 << 30;

/// Registers (or re-registers) node `name` with `caps` and 4 GiB of memory.
fn register(h: &mut H, name: &str, caps: NodeCapabilities) {
    h.ok(Command::RegisterNode(RegisterNodeRequest {
        name: name.into(),
        agent_url: "http://127.0.0.1:1".into(),
        capacity: Capacity {
            cpu_millis: 2000,
            memory_bytes: 4 << 30,
            disk_bytes: 100 << 30,
        },
        capabilities: caps,
        zone: String::new(),
        labels: BTreeMap::new(),
        agent_version: "test".into(),
        underlay_ip: String::new(),
    }));
}

fn probing() -> NodeCapabilities {
    NodeCapabilities {
        containers: true,
        vm_probe_pending: true,
        vm_unavailable_reason: Some("probing the VM accelerator".into()),
        ..Default::default()
    }
}

fn vms_ok() -> NodeCapabilities {
    NodeCapabilities {
        containers: true,
        vms: true,
        accelerator: Some("tcg".into()),
        ..Default::default()
    }
}

fn vm(name: &str, mem: u64) -> Instance {
    let mut i = instance(name, mem);
    i.spec.instance_type = InstanceType::Vm;
    i
}

fn create(h: &mut H, i: Instance) -> CommandResult {
    h.run(Command::CreateInstance {
        instance: Box::new(i.into()),
        idempotency_key: None,
    })
}

/// What `retry_pending` proposes for an unplaced pending instance.
fn retry(h: &mut H, name: &str) -> CommandResult {
    let id = get(h, name).meta.id;
    h.run(Command::ScheduleInstance {
        id,
        node: None,
        message: String::new(),
    })
}

fn get(h: &H, name: &str) -> Instance {
    h.sm.instance_by_name("default", name)
        .unwrap_or_else(|| panic!("no instance {name}"))
        .clone()
}

fn reasons(h: &H, name: &str) -> Vec<String> {
    h.sm.events
        .iter()
        .filter(|e| e.name == name)
        .map(|e| e.reason.clone())
        .collect()
}

#[test]
fn a_vm_create_waits_pending_while_a_node_probes_and_is_placed_once_it_can() {
    let mut h = H::new();
    register(&mut h, "n1", probing());
    let v = inst(create(&mut h, vm("v", GIB)).unwrap());
    assert_eq!(v.status.state, InstanceState::Pending);
    assert_eq!(v.status.node, None);
    assert!(
        v.status.message.contains("n1") && v.status.message.contains("probing"),
        "{}",
        v.status.message
    );
    assert!(v.status.ip.is_some(), "it has its address while it waits");
    assert_eq!(reasons(&h, "v"), ["Created", "WaitingForVmProbe"]);
    // Nothing is reserved for it yet.
    let views = crate::placement::node_views(&h.sm, None);
    assert_eq!(views[0].allocated.memory_bytes, 0);

    // Still probing: the retry changes nothing.
    let e = h.err(Command::ScheduleInstance {
        id: v.meta.id.clone(),
        node: None,
        message: String::new(),
    });
    assert_eq!(e.code, ErrorCode::Unschedulable);

    // The probe ends with VM support: the next retry places it.
    register(&mut h, "n1", vms_ok());
    let placed = inst(retry(&mut h, "v").unwrap());
    assert_eq!(placed.status.node.as_deref(), Some("n1"));
    assert_eq!(placed.status.state, InstanceState::Scheduled);
    assert!(placed.status.message.is_empty());
    assert_eq!(
        reasons(&h, "v"),
        ["Created", "WaitingForVmProbe", "Scheduled"]
    );
}

#[test]
fn the_wait_ends_failed_with_the_reason_when_the_probe_finds_no_vm_support() {
    let mut h = H::new();
    register(&mut h, "n1", probing());
    create(&mut h, vm("v", GIB)).unwrap();
    register(
        &mut h,
        "n1",
        NodeCapabilities {
            containers: true,
            vm_unavailable_reason: Some("guest kernel: no modules.dep".into()),
            ..Default::default()
        },
    );
    let failed = inst(retry(&mut h, "v").unwrap());
    assert_eq!(failed.status.state, InstanceState::Failed);
    assert_eq!(failed.status.node, None);
    assert!(
        failed.status.message.contains("no node can run VMs")
            && failed
                .status
                .message
                .contains("n1: guest kernel: no modules.dep"),
        "{}",
        failed.status.message
    );
    assert_eq!(reasons(&h, "v").last().unwrap(), "FailedScheduling");
    // Failed: the controller stops retrying it; a retry anyway changes nothing.
    h.err(Command::ScheduleInstance {
        id: failed.meta.id.clone(),
        node: None,
        message: String::new(),
    });
    // A VM-capable node joins: `start` places it.
    register(&mut h, "n2", vms_ok());
    let started = inst(
        h.run(Command::SetInstanceDesired {
            project: "default".into(),
            name: "v".into(),
            action: InstanceAction::Start,
            version: None,
        })
        .unwrap(),
    );
    assert_eq!(started.status.node.as_deref(), Some("n2"));
}

#[test]
fn the_wait_ends_when_the_probing_node_goes_down() {
    let mut h = H::new();
    register(&mut h, "n1", probing());
    create(&mut h, vm("v", GIB)).unwrap();
    h.ok(Command::MarkNodeDown {
        name: "n1".into(),
        reason: "missed heartbeats".into(),
    });
    let failed = inst(retry(&mut h, "v").unwrap());
    assert_eq!(failed.status.state, InstanceState::Failed);
}

#[test]
fn creates_that_waiting_would_not_help_are_refused_and_change_nothing() {
    let mut h = H::new();
    // No node probes: refused as before.
    register(&mut h, "n1", vms_ok());
    register(
        &mut h,
        "n1",
        NodeCapabilities {
            containers: true,
            ..Default::default()
        },
    );
    let e = h.err(Command::CreateInstance {
        instance: Box::new(vm("v1", GIB).into()),
        idempotency_key: None,
    });
    assert_eq!(e.code, ErrorCode::Unschedulable);
    assert!(e.message.contains("no node can run VMs"), "{}", e.message);

    // A node probes, but the VM would not fit on it anyway (8 GiB > 4 GiB).
    register(&mut h, "n1", probing());
    let e = h.err(Command::CreateInstance {
        instance: Box::new(vm("v2", 8 * GIB).into()),
        idempotency_key: None,
    });
    assert_eq!(e.code, ErrorCode::Unschedulable);

    // A cordoned probing node is no reason to wait.
    h.ok(Command::SetNodeCordon {
        name: "n1".into(),
        cordoned: true,
        version: None,
    });
    let e = h.err(Command::CreateInstance {
        instance: Box::new(vm("v3", GIB).into()),
        idempotency_key: None,
    });
    assert_eq!(e.code, ErrorCode::Unschedulable);

    // Containers never wait for a VM probe: they are placed at once.
    h.ok(Command::SetNodeCordon {
        name: "n1".into(),
        cordoned: false,
        version: None,
    });
    let c = inst(h.create("c", GIB, None).unwrap());
    assert_eq!(c.status.node.as_deref(), Some("n1"));
}

#[test]
fn a_vm_that_fits_a_capable_node_is_placed_even_while_another_probes() {
    let mut h = H::new();
    register(&mut h, "n1", probing());
    register(&mut h, "n2", vms_ok());
    let v = inst(create(&mut h, vm("v", GIB)).unwrap());
    assert_eq!(v.status.node.as_deref(), Some("n2"));
    assert_eq!(v.status.state, InstanceState::Scheduled);
}
