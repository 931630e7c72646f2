//! Unit tests of the pure state machine.

use std::collections::BTreeMap;

use nimbus_api::agent::{InstanceReport, RegisterNodeRequest};
use nimbus_api::{
    Capacity, DesiredState, ErrorCode, Image, Instance, InstanceSpec, InstanceState,
    InstanceStatus, InstanceType, Meta, NodeCapabilities, RestartPolicy,
};

use crate::{
    Command, CommandEnvelope, CommandOutput, InstanceAction, StateMachine, COMMAND_FORMAT_VERSION,
};

pub(crate) struct H {
    pub(crate) sm: StateMachine,
    index: u64,
}

impl H {
    pub(crate) fn new() -> Self {
        let mut h = Self {
            sm: StateMachine::default(),
            index: 0,
        };
        h.ok(Command::CreateProject {
            name: "default".into(),
            description: String::new(),
            idempotency_key: None,
        });
        h.ok(Command::PutImage(image("busybox", "sha256:aa")));
        h
    }
    pub(crate) fn run(&mut self, c: Command) -> crate::CommandResult {
        self.index += 1;
        let env = CommandEnvelope {
            format: COMMAND_FORMAT_VERSION,
            time: format!("2026-01-01T00:00:{:02}Z", self.index % 60),
            new_id: format!("id-{}", self.index),
            command: c,
        };
        self.sm.apply(self.index, &env)
    }
    /// Applies `c` with the log time `time` (RFC 3339).
    pub(crate) fn run_at(&mut self, time: &str, c: Command) -> crate::CommandResult {
        self.index += 1;
        let env = CommandEnvelope {
            format: COMMAND_FORMAT_VERSION,
            time: time.into(),
            new_id: format!("id-{}", self.index),
            command: c,
        };
        self.sm.apply(self.index, &env)
    }
    pub(crate) fn ok(&mut self, c: Command) -> CommandOutput {
        self.run(c).expect("command should succeed")
    }
    pub(crate) fn err(&mut self, c: Command) -> nimbus_api::ApiError {
        let before = self.sm.clone();
        let e = self.run(c).expect_err("command should fail");
        let mut after = self.sm.clone();
        after.revision = before.revision;
        assert_eq!(before, after, "a failed command must not change the state");
        e
    }
    pub(crate) fn node(&mut self, name: &str, vms: bool) {
        self.ok(Command::RegisterNode(RegisterNodeRequest {
            name: name.into(),
            agent_url: "http://127.0.0.1:1".into(),
            capacity: Capacity {
                cpu_millis: 2000,
                memory_bytes: 4 << 30,
                disk_bytes: 100 << 30,
            },
            capabilities: NodeCapabilities {
                containers: true,
                vms,
                ..Default::default()
            },
            zone: String::new(),
            labels: BTreeMap::new(),
            agent_version: "test".into(),
            underlay_ip: String::new(),
        }));
    }
    pub(crate) fn create(
        &mut self,
        name: &str,
        mem: u64,
        key: Option<&str>,
    ) -> crate::CommandResult {
        self.run(Command::CreateInstance {
            instance: Box::new(instance(name, mem).into()),
            idempotency_key: key.map(String::from),
        })
    }
}

fn image(name: &str, digest: &str) -> Image {
    Image {
        meta: Meta {
            id: String::new(),
            name: name.into(),
            project: String::new(),
            version: 0,
            created_at: String::new(),
            updated_at: String::new(),
            labels: BTreeMap::new(),
        },
        digest: digest.into(),
        layers: vec![],
        size_bytes: 1,
        default_command: vec!["sh".into()],
        default_env: vec![],
        working_dir: String::new(),
    }
}

pub(crate) fn instance(name: &str, mem: u64) -> Instance {
    Instance {
        meta: Meta {
            id: String::new(),
            name: name.into(),
            project: "default".into(),
            version: 0,
            created_at: String::new(),
            updated_at: String::new(),
            labels: BTreeMap::new(),
        },
        spec: InstanceSpec {
            instance_type: InstanceType::Container,
            image: "busybox".into(),
            image_digest: "sha256:aa".into(),
            cpus: 1.0,
            memory_bytes: mem,
            disk_bytes: 1 << 30,
            command: vec![],
            env: BTreeMap::new(),
            restart: RestartPolicy::Never,
            pids_limit: 100,
            user_data: None,
            ssh_keys: vec![],
            desired: DesiredState::Running,
            restart_nonce: 0,
            constraints: vec![],
            spread_group: None,
            anti_affinity: false,
            priority_class: None,
            priority: 0,
            network: nimbus_api::DEFAULT_NETWORK.into(),
            subnet: String::new(),
            security_groups: vec![],
            publish: vec![],
            secrets: vec![],
            volumes: vec![],
        },
        status: InstanceStatus::default(),
    }
}

pub(crate) fn inst(o: CommandOutput) -> Instance {
    match o {
        CommandOutput::Instance(i) => *i,
        other => panic!("expected an instance, got {other:?}"),
    }
}

#[test]
fn create_places_and_allocates_unique_ips() {
    let mut h = H::new();
    h.node("n1", false);
    let a = inst(h.create("a", 1 << 30, None).unwrap());
    let b = inst(h.create("b", 1 << 30, None).unwrap());
    assert_eq!(a.status.node.as_deref(), Some("n1"));
    assert_eq!(a.status.state, InstanceState::Scheduled);
    assert_eq!(a.status.ip.as_deref(), Some("10.213.0.2"));
    assert_eq!(b.status.ip.as_deref(), Some("10.213.0.3"));
    assert_eq!(a.status.generation, 1);
}

#[test]
fn bad_creates_change_nothing() {
    let mut h = H::new();
    let e = h.err(Command::CreateInstance {
        instance: Box::new(instance("a", 1 << 30).into()),
        idempotency_key: None,
    });
    assert_eq!(e.code, ErrorCode::Unschedulable);
    assert!(e.message.contains("0 of 0 nodes"), "{}", e.message);
    h.node("n1", false);
    h.create("a", 1 << 30, None).unwrap();
    assert_eq!(
        h.err(Command::CreateInstance {
            instance: Box::new(instance("a", 1 << 30).into()),
            idempotency_key: None
        })
        .code,
        ErrorCode::AlreadyExists
    );
    let e = h.err(Command::CreateInstance {
        instance: Box::new(instance("big", 8 << 30).into()),
        idempotency_key: None,
    });
    assert_eq!(e.code, ErrorCode::Unschedulable);
    assert!(e.message.contains("1 insufficient memory"), "{}", e.message);
    let mut bad = instance("x", 1 << 20);
    bad.spec.image_digest = "sha256:nope".into();
    assert_eq!(
        h.err(Command::CreateInstance {
            instance: Box::new(bad.into()),
            idempotency_key: None
        })
        .field
        .as_deref(),
        Some("image")
    );
    let mut vm = instance("vm", 1 << 30);
    vm.spec.instance_type = InstanceType::Vm;
    let e = h.err(Command::CreateInstance {
        instance: Box::new(vm.into()),
        idempotency_key: None,
    });
    assert!(e.message.contains("no node can run VMs"), "{}", e.message);
    let mut other = instance("y", 1 << 20);
    other.meta.project = "nope".into();
    assert_eq!(
        h.err(Command::CreateInstance {
            instance: Box::new(other.into()),
            idempotency_key: None
        })
        .code,
        ErrorCode::NotFound
    );
}

#[test]
fn idempotency_key_returns_the_same_instance() {
    let mut h = H::new();
    h.node("n1", false);
    let a = inst(h.create("a", 1 << 20, Some("k1")).unwrap());
    let again = inst(h.create("a", 1 << 20, Some("k1")).unwrap());
    assert_eq!(a.meta.id, again.meta.id);
    assert_eq!(h.sm.instances.len(), 1);
    assert_eq!(
        h.create("b", 1 << 20, Some("k1")).unwrap_err().code,
        ErrorCode::Conflict
    );
}

#[test]
fn lifecycle_reports_and_fencing() {
    let mut h = H::new();
    h.node("n1", false);
    h.node("n2", false);
    let a = inst(h.create("a", 1 << 20, None).unwrap());
    let node = a.status.node.clone().unwrap();
    let other = if node == "n1" { "n2" } else { "n1" };
    let report = |state, pid, generation| InstanceReport {
        id: a.meta.id.clone(),
        generation,
        state,
        pid,
        exit_code: None,
        message: String::new(),
        restart_count: 0,
        accelerator: None,
        deleted: false,
    };
    h.ok(Command::ReportStatus {
        node: node.clone(),
        reports: vec![report(InstanceState::Running, Some(42), 1)],
        interfaces: vec![],
    });
    assert_eq!(
        h.sm.instances[&a.meta.id].status.state,
        InstanceState::Running
    );
    assert_eq!(h.sm.instances[&a.meta.id].status.pid, Some(42));
    // Stale generation and wrong node are ignored.
    h.ok(Command::ReportStatus {
        node: node.clone(),
        reports: vec![report(InstanceState::Stopped, None, 0)],
        interfaces: vec![],
    });
    h.ok(Command::ReportStatus {
        node: other.into(),
        reports: vec![report(InstanceState::Stopped, None, 1)],
        interfaces: vec![],
    });
    assert_eq!(
        h.sm.instances[&a.meta.id].status.state,
        InstanceState::Running
    );
    // Stop, version check.
    let v = h.sm.instances[&a.meta.id].meta.version;
    let e = h.err(Command::SetInstanceDesired {
        project: "default".into(),
        name: "a".into(),
        action: InstanceAction::Stop,
        version: Some(v + 5),
    });
    assert_eq!(e.code, ErrorCode::VersionConflict);
    h.ok(Command::SetInstanceDesired {
        project: "default".into(),
        name: "a".into(),
        action: InstanceAction::Stop,
        version: Some(v),
    });
    assert_eq!(
        h.sm.instances[&a.meta.id].status.state,
        InstanceState::Stopping
    );
    assert_eq!(
        h.sm.instances[&a.meta.id].spec.desired,
        DesiredState::Stopped
    );
    // Delete waits for the agent.
    h.ok(Command::SetInstanceDesired {
        project: "default".into(),
        name: "a".into(),
        action: InstanceAction::Delete,
        version: None,
    });
    assert_eq!(
        h.sm.instances[&a.meta.id].status.state,
        InstanceState::Deleting
    );
    assert_eq!(
        h.err(Command::SetInstanceDesired {
            project: "default".into(),
            name: "a".into(),
            action: InstanceAction::Start,
            version: None
        })
        .code,
        ErrorCode::NotFound
    );
    let mut gone = report(InstanceState::Stopped, None, 1);
    gone.deleted = true;
    h.ok(Command::ReportStatus {
        node,
        reports: vec![gone],
        interfaces: vec![],
    });
    assert!(h.sm.instances.is_empty());
    assert!(h
        .sm
        .events
        .iter()
        .any(|e| e.reason == "Deleted" && e.name == "a"));
}

#[test]
fn node_down_fails_its_instances_and_heartbeat_revives() {
    let mut h = H::new();
    h.node("n1", false);
    let a = inst(h.create("a", 1 << 20, None).unwrap());
    h.ok(Command::MarkNodeDown {
        name: "n1".into(),
        reason: "missed heartbeats".into(),
    });
    assert_eq!(
        h.sm.instances[&a.meta.id].status.state,
        InstanceState::Failed
    );
    assert_eq!(
        h.create("b", 1 << 20, None).unwrap_err().code,
        ErrorCode::Unschedulable
    );
    h.ok(Command::MarkNodeReady { name: "n1".into() });
    assert_eq!(h.sm.nodes["n1"].state, nimbus_api::NodeState::Ready);
    assert!(h.sm.events.iter().any(|e| e.reason == "Ready"));
    // Entries of older builds (a heartbeat per log entry) still apply.
    h.ok(Command::MarkNodeDown {
        name: "n1".into(),
        reason: "missed heartbeats".into(),
    });
    h.ok(Command::NodeHeartbeat {
        name: "n1".into(),
        utilization: None,
    });
    assert_eq!(h.sm.nodes["n1"].state, nimbus_api::NodeState::Ready);
    assert_eq!(
        h.err(Command::MarkNodeReady {
            name: "nope".into()
        })
        .code,
        ErrorCode::NotFound
    );
}

#[test]
fn projects_and_images() {
    let mut h = H::new();
    h.ok(Command::CreateProject {
        name: "team".into(),
        description: String::new(),
        idempotency_key: None,
    });
    assert_eq!(
        h.err(Command::CreateProject {
            name: "team".into(),
            description: String::new(),
            idempotency_key: None
        })
        .code,
        ErrorCode::AlreadyExists
    );
    assert_eq!(
        h.err(Command::CreateProject {
            name: "Bad_Name".into(),
            description: String::new(),
            idempotency_key: None
        })
        .field
        .as_deref(),
        Some("name")
    );
    assert_eq!(
        h.err(Command::DeleteProject {
            name: "default".into()
        })
        .code,
        ErrorCode::Conflict
    );
    h.ok(Command::DeleteProject {
        name: "team".into(),
    });
    h.node("n1", false);
    h.create("a", 1 << 20, None).unwrap();
    assert_eq!(
        h.err(Command::DeleteImage {
            name: "busybox".into()
        })
        .code,
        ErrorCode::Conflict
    );
}

#[test]
fn snapshot_round_trip_and_determinism() {
    let mut h = H::new();
    h.node("n1", false);
    for i in 0..6 {
        h.create(&format!("i{i}"), 1 << 20, None).unwrap();
    }
    let json = serde_json::to_vec(&h.sm).unwrap();
    let restored: StateMachine = serde_json::from_slice(&json).unwrap();
    assert_eq!(restored, h.sm);
    // Replaying the same commands on a fresh machine gives the same state.
    let mut h2 = H::new();
    h2.node("n1", false);
    for i in 0..6 {
        h2.create(&format!("i{i}"), 1 << 20, None).unwrap();
    }
    assert_eq!(h2.sm, h.sm);
}

#[test]
fn refuses_unknown_format() {
    let mut sm = StateMachine::default();
    let env = CommandEnvelope {
        format: COMMAND_FORMAT_VERSION + 1,
        time: String::new(),
        new_id: String::new(),
        command: Command::Noop,
    };
    let e = sm.apply(1, &env).unwrap_err();
    assert!(e.message.contains("upgrade"), "{}", e.message);
}

#[test]
fn drain_moves_instances_and_fences_the_old_node() {
    let mut h = H::new();
    h.node("n1", false);
    let a = inst(h.create("a", 1 << 20, None).unwrap());
    assert_eq!(a.status.node.as_deref(), Some("n1"));
    // Nowhere to go: the drain cordons and records the failure, the instance stays.
    h.ok(Command::DrainNode { name: "n1".into() });
    assert!(h.sm.nodes["n1"].cordoned);
    assert_eq!(
        h.sm.instances[&a.meta.id].status.node.as_deref(),
        Some("n1")
    );
    assert!(h.sm.events.iter().any(|e| e.reason == "DrainFailed"));
    h.node("n2", false);
    h.ok(Command::DrainNode { name: "n1".into() });
    let moved = &h.sm.instances[&a.meta.id];
    assert_eq!(moved.status.node.as_deref(), Some("n2"));
    assert_eq!(moved.status.generation, 2);
    assert_eq!(moved.status.state, InstanceState::Scheduled);
    // The private address moves with the instance.
    assert_eq!(moved.status.ip.as_deref(), Some("10.213.0.2"));
    // The old node's late report is fenced off.
    let stale = InstanceReport {
        id: a.meta.id.clone(),
        generation: 1,
        state: InstanceState::Running,
        pid: Some(1),
        exit_code: None,
        message: String::new(),
        restart_count: 0,
        accelerator: None,
        deleted: false,
    };
    h.ok(Command::ReportStatus {
        node: "n1".into(),
        reports: vec![stale],
        interfaces: vec![],
    });
    assert_eq!(
        h.sm.instances[&a.meta.id].status.state,
        InstanceState::Scheduled
    );
    assert!(h.sm.instances_on("n1").next().is_none());
}

#[test]
fn node_down_fails_over_restart_always_instances() {
    let mut h = H::new();
    h.node("n1", false);
    let mut keep = instance("keep", 1 << 20);
    keep.spec.restart = RestartPolicy::Always;
    let keep = inst(h.ok(Command::CreateInstance {
        instance: Box::new(keep.into()),
        idempotency_key: None,
    }));
    let once = inst(h.create("once", 1 << 20, None).unwrap());
    h.node("n2", false);
    h.ok(Command::MarkNodeDown {
        name: "n1".into(),
        reason: "missed heartbeats".into(),
    });
    assert_eq!(
        h.sm.instances[&keep.meta.id].status.node.as_deref(),
        Some("n2")
    );
    assert_eq!(
        h.sm.instances[&once.meta.id].status.node.as_deref(),
        Some("n1")
    );
    assert_eq!(
        h.sm.instances[&once.meta.id].status.state,
        InstanceState::Failed
    );
}

#[test]
fn project_idempotency_key() {
    let mut h = H::new();
    let create = |key: &str, name: &str| Command::CreateProject {
        name: name.into(),
        description: String::new(),
        idempotency_key: Some(key.into()),
    };
    let a = h.ok(create("k", "team"));
    let b = h.ok(create("k", "team"));
    assert_eq!(a, b);
    assert_eq!(h.err(create("k", "other")).code, ErrorCode::Conflict);
    assert_eq!(
        h.err(Command::CreateProject {
            name: "team".into(),
            description: String::new(),
            idempotency_key: None
        })
        .code,
        ErrorCode::AlreadyExists
    );
}

#[test]
fn batch_applies_each_command_on_its_own() {
    let mut h = H::new();
    let env = |name: &str, id: &str| CommandEnvelope {
        format: COMMAND_FORMAT_VERSION,
        time: "2026-01-01T00:00:00Z".into(),
        new_id: id.into(),
        command: Command::CreateProject {
            name: name.into(),
            description: String::new(),
            idempotency_key: None,
        },
    };
    let out = h.ok(Command::Batch {
        commands: vec![
            env("p1", "a"),
            env("Bad", "b"),
            env("p2", "c"),
            env("p1", "d"),
        ],
    });
    let CommandOutput::Batch(results) = out else {
        panic!("expected a batch")
    };
    assert!(results[0].is_ok());
    assert_eq!(
        results[1].as_ref().unwrap_err().code,
        ErrorCode::InvalidArgument
    );
    assert!(results[2].is_ok());
    assert_eq!(
        results[3].as_ref().unwrap_err().code,
        ErrorCode::AlreadyExists
    );
    assert!(h.sm.projects.contains_key("p1") && h.sm.projects.contains_key("p2"));
    assert_eq!(h.sm.projects["p1"].meta.id, "a");
}

#[test]
fn every_command_round_trips_through_the_log_encoding() {
    let env = |command: Command| CommandEnvelope {
        format: COMMAND_FORMAT_VERSION,
        time: "2026-01-01T00:00:00Z".into(),
        new_id: "id".into(),
        command,
    };
    let commands = vec![
        Command::Noop,
        Command::Batch {
            commands: vec![
                env(Command::Noop),
                env(Command::DrainNode { name: "n".into() }),
            ],
        },
        Command::CreateProject {
            name: "p".into(),
            description: String::new(),
            idempotency_key: Some("k".into()),
        },
        Command::CreateInstance {
            instance: Box::new(instance("a", 1 << 20).into()),
            idempotency_key: None,
        },
        Command::SetInstanceDesired {
            project: "p".into(),
            name: "a".into(),
            action: InstanceAction::Restart,
            version: Some(3),
        },
        Command::ReportStatus {
            node: "n".into(),
            reports: vec![],
            interfaces: vec![],
        },
        Command::MarkNodeDown {
            name: "n".into(),
            reason: "r".into(),
        },
        Command::PutImage(image("busybox", "sha256:aa")),
    ];
    for c in commands {
        let e = env(c);
        let bytes = serde_json::to_vec(&e).unwrap_or_else(|err| panic!("{e:?} must encode: {err}"));
        let back: CommandEnvelope = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back, e);
    }
    // A batch's output (results) must encode too: it is the Raft response.
    let out: crate::CommandResult = Ok(CommandOutput::Batch(vec![
        Ok(CommandOutput::None),
        Err(nimbus_api::ApiError::conflict("x")),
    ]));
    let bytes = serde_json::to_vec(&out).unwrap();
    let back: crate::CommandResult = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(back, out);
}

#[test]
fn constraints_spread_groups_and_validation() {
    let mut h = H::new();
    h.node("n1", false);
    let mut reg = RegisterNodeRequest {
        name: "n2".into(),
        agent_url: "http://127.0.0.1:2".into(),
        capacity: Capacity {
            cpu_millis: 2000,
            memory_bytes: 4 << 30,
            disk_bytes: 100 << 30,
        },
        capabilities: NodeCapabilities {
            containers: true,
            ..Default::default()
        },
        zone: "b".into(),
        labels: BTreeMap::from([("disk".to_string(), "ssd".to_string())]),
        agent_version: "test".into(),
        underlay_ip: String::new(),
    };
    h.ok(Command::RegisterNode(reg.clone()));
    let with = |name: &str, constraints: &[&str], group: Option<&str>, anti: bool| {
        let mut i = instance(name, 1 << 20);
        i.spec.constraints = constraints.iter().map(ToString::to_string).collect();
        i.spec.spread_group = group.map(String::from);
        i.spec.anti_affinity = anti;
        Command::CreateInstance {
            instance: Box::new(i.into()),
            idempotency_key: None,
        }
    };
    // Label constraint picks the labelled node.
    let a = inst(h.ok(with("a", &["disk=ssd"], None, false)));
    assert_eq!(a.status.node.as_deref(), Some("n2"));
    let b = inst(h.ok(with("b", &["disk!=ssd"], None, false)));
    assert_eq!(b.status.node.as_deref(), Some("n1"));
    // Unknown label key or zone: 422 naming the constraint.
    let e = h.err(with("c", &["gpu=yes"], None, false));
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::InvalidArgument, Some("constraints[0]"))
    );
    let e = h.err(with("c", &["zone in (mars)"], None, false));
    assert_eq!(e.code, ErrorCode::InvalidArgument);
    // Anti-affinity: two members never share a node; a third has nowhere to go.
    let g1 = inst(h.ok(with("g1", &[], Some("web"), true)));
    let g2 = inst(h.ok(with("g2", &[], Some("web"), true)));
    assert_ne!(g1.status.node, g2.status.node);
    let e = h.err(with("g3", &[], Some("web"), true));
    assert_eq!(e.code, ErrorCode::Unschedulable);
    // A new node makes room for the third member.
    reg.name = "n3".into();
    h.ok(Command::RegisterNode(reg));
    let g3 = inst(h.ok(with("g3", &[], Some("web"), true)));
    assert_eq!(g3.status.node.as_deref(), Some("n3"));
}

#[path = "vpc_tests.rs"]
mod vpc_tests;

#[test]
fn creates_resolve_the_image_in_apply_and_old_entries_still_apply() {
    let mut h = H::new();
    h.node("n1", true);
    // A draft names the image; apply resolves its digest.
    let mut d: nimbus_api::InstanceDraft = instance("byname", 16 << 20).into();
    d.spec.image_digest.clear();
    let i = inst(h.ok(Command::CreateInstance {
        instance: Box::new(d.clone()),
        idempotency_key: None,
    }));
    assert_eq!(i.spec.image_digest, "sha256:aa");
    d.name = "nope".into();
    d.spec.image = "missing".into();
    assert_eq!(
        h.err(Command::CreateInstance {
            instance: Box::new(d.clone()),
            idempotency_key: None,
        })
        .field
        .as_deref(),
        Some("image")
    );
    // A VM disk smaller than its image is refused here, where the image is known.
    d.spec.image = "busybox".into();
    d.spec.instance_type = InstanceType::Vm;
    d.spec.disk_bytes = 0;
    assert_eq!(
        h.err(Command::CreateInstance {
            instance: Box::new(d),
            idempotency_key: None,
        })
        .field
        .as_deref(),
        Some("disk")
    );
    // A log entry of an older build carries a whole instance with the digest resolved.
    let old = serde_json::json!({
        "op": "create_instance",
        "idempotency_key": null,
        "instance": serde_json::to_value(instance("legacy", 16 << 20)).unwrap(),
    });
    let c: Command = serde_json::from_value(old).expect("an old entry decodes");
    let i = inst(h.ok(c));
    assert_eq!(i.meta.name, "legacy");
    assert_eq!(i.status.node.as_deref(), Some("n1"));
}
