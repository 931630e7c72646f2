//! The derived indexes and targeted wake-ups under random command sequences: after every
//! command the maintained indexes equal indexes rebuilt from scratch, and every node whose
//! network map or assignments changed was woken (its revision moved to this command's).

use std::collections::BTreeMap;

use nimbus_api::agent::{AssignmentsResponse, InstanceReport, RegisterNodeRequest};
use nimbus_api::lb::{LbBackends, LoadBalancerSpec};
use nimbus_api::{
    AddRuleRequest, Capacity, CreateNetworkRequest, CreateSecurityGroupRequest, InstanceState,
    NodeCapabilities,
};

use crate::machine_tests::{instance, H};
use crate::{netmap, Command, InstanceAction};

/// A small deterministic generator (no dependency needed for a test).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 33) as usize) % n
    }
}

const NODES: [&str; 4] = ["n0", "n1", "n2", "n3"];

fn register(h: &mut H, node: &str, underlay: &str) {
    h.run(Command::RegisterNode(RegisterNodeRequest {
        name: node.into(),
        agent_url: "http://127.0.0.1:1".into(),
        capacity: Capacity {
            cpu_millis: 64_000,
            memory_bytes: 64 << 30,
            disk_bytes: 1 << 40,
        },
        capabilities: NodeCapabilities {
            containers: true,
            ..Default::default()
        },
        zone: String::new(),
        labels: [("host".to_string(), node.to_string())].into(),
        agent_version: "test".into(),
        underlay_ip: underlay.into(),
    }))
    .expect("register");
}

fn lb(label: &str) -> LoadBalancerSpec {
    let mut s = crate::lb_tests::spec(
        8080,
        LbBackends {
            label: Some(label.into()),
            ..LbBackends::default()
        },
    );
    s.replicas = Some(2);
    s
}

/// Everything agents are sent, with the revisions left out.
fn views(h: &H) -> BTreeMap<String, (nimbus_api::agent::NetworkMap, AssignmentsResponse)> {
    NODES
        .iter()
        .map(|n| {
            let mut map = netmap::network_map(&h.sm, n);
            map.revision = 0;
            let mut a = netmap::assignments_of(&h.sm, n, false);
            a.revision = 0;
            ((*n).to_string(), (map, a))
        })
        .collect()
}

fn step(h: &mut H, rng: &mut Lcg, names: &mut Vec<(String, String)>) {
    let projects = ["default", "other"];
    match rng.next(10) {
        0..=2 => {
            let p = projects[rng.next(2)];
            let name = format!("i{}", names.len());
            let mut i = instance(&name, 64 << 20);
            i.meta.project = p.into();
            i.spec.cpus = 0.1;
            if p == "default" {
                i.spec.network = ["default", "net2"][rng.next(2)].into();
                let all = ["default", "web", "db"];
                i.spec.security_groups = vec![all[rng.next(3)].into()];
                if rng.next(2) == 0 {
                    i.spec.security_groups.push(all[rng.next(3)].into());
                    i.spec.security_groups.dedup();
                }
            }
            if rng.next(2) == 0 {
                i.meta.labels.insert("app".into(), "web".into());
            }
            i.spec.constraints = vec![format!("host={}", NODES[rng.next(4)])];
            if h.run(Command::CreateInstance {
                instance: Box::new(i.into()),
                idempotency_key: None,
            })
            .is_ok()
            {
                names.push((p.into(), name));
            }
        }
        3 if !names.is_empty() => {
            let (p, n) = names[rng.next(names.len())].clone();
            let action = [
                InstanceAction::Stop,
                InstanceAction::Start,
                InstanceAction::Restart,
                InstanceAction::Delete,
            ][rng.next(4)];
            let _ = h.run(Command::SetInstanceDesired {
                project: p,
                name: n,
                action,
                version: None,
            });
        }
        4 | 5 if !names.is_empty() => {
            let (p, n) = names[rng.next(names.len())].clone();
            let Some(i) = h.sm.instance_by_name(&p, &n).cloned() else {
                return;
            };
            let Some(node) = i.status.node.clone() else {
                return;
            };
            let deleted = i.spec.desired == nimbus_api::DesiredState::Deleted;
            let state = [InstanceState::Running, InstanceState::Stopped][rng.next(2)];
            let _ = h.run(Command::ReportStatus {
                node,
                reports: vec![InstanceReport {
                    id: i.meta.id.clone(),
                    generation: i.status.generation,
                    state,
                    pid: Some(100 + rng.next(1000) as u32),
                    exit_code: None,
                    message: String::new(),
                    restart_count: 0,
                    accelerator: None,
                    deleted,
                }],
                interfaces: vec![],
            });
        }
        6 => {
            let node = NODES[rng.next(4)].to_string();
            let c = match rng.next(4) {
                0 => Command::MarkNodeDown {
                    name: node,
                    reason: "test".into(),
                },
                1 => Command::MarkNodeReady { name: node },
                2 => Command::DrainNode { name: node },
                _ => Command::SetNodeCordon {
                    name: node,
                    cordoned: false,
                    version: None,
                },
            };
            let _ = h.run(c);
        }
        7 => {
            let _ = if rng.next(2) == 0 {
                h.run(Command::AddSecurityGroupRule {
                    project: "default".into(),
                    group: "db".into(),
                    request: AddRuleRequest {
                        direction: None,
                        protocol: "tcp".into(),
                        ports: Some(format!("{}", 5000 + rng.next(100))),
                        cidr: None,
                        group: Some("web".into()),
                        description: String::new(),
                    },
                })
            } else {
                let rule =
                    h.sm.security_group_by_name("default", "db")
                        .and_then(|g| g.rules.last())
                        .map(|r| r.id.clone())
                        .unwrap_or_default();
                h.run(Command::DeleteSecurityGroupRule {
                    project: "default".into(),
                    group: "db".into(),
                    rule,
                })
            };
        }
        8 if !h.sm.drains.is_empty() && rng.next(2) == 0 => {
            let ids = h.sm.drains.keys().cloned().collect();
            h.run(Command::FinishDrain { ids }).expect("finish drains");
        }
        8 => {
            let _ = if h.sm.loadbalancers.is_empty() {
                h.run(Command::CreateLoadBalancer {
                    project: "default".into(),
                    name: "front".into(),
                    spec: Box::new(lb("app=web")),
                    labels: BTreeMap::new(),
                })
            } else {
                h.run(Command::DeleteLoadBalancer {
                    project: "default".into(),
                    name: "front".into(),
                })
            };
        }
        _ => {
            let node = NODES[rng.next(4)];
            register(h, node, &format!("192.0.2.{}", 10 + rng.next(6)));
        }
    }
}

#[test]
fn woken_network_maps_match_the_maps_that_changed() {
    for seed in 1..=6u64 {
        let mut h = H::new();
        let mut rng = Lcg(seed);
        for (k, n) in NODES.iter().enumerate() {
            register(&mut h, n, &format!("192.0.2.{}", k + 1));
        }
        h.ok(Command::CreateProject {
            name: "other".into(),
            description: String::new(),
            idempotency_key: None,
        });
        h.ok(Command::CreateNetwork {
            project: "default".into(),
            request: CreateNetworkRequest {
                name: "net2".into(),
                cidr: Some("10.99.0.0/24".into()),
                subnets: vec![],
            },
        });
        for g in ["web", "db"] {
            h.ok(Command::CreateSecurityGroup {
                project: "default".into(),
                request: CreateSecurityGroupRequest {
                    name: g.into(),
                    description: String::new(),
                },
            });
        }
        let mut names = Vec::new();
        let mut before = views(&h);
        for i in 0..300 {
            step(&mut h, &mut rng, &mut names);
            assert!(
                h.sm.index_is_consistent(),
                "seed {seed} step {i}: index drifted"
            );
            let after = views(&h);
            let rev = h.sm.revision;
            for n in NODES {
                let (m0, a0) = &before[n];
                let (m1, a1) = &after[n];
                if m0 != m1 {
                    assert_eq!(
                        h.sm.network_revision(n),
                        rev,
                        "seed {seed} step {i}: {n}'s network map changed without a wake-up"
                    );
                }
                if a0 != a1 {
                    assert_eq!(
                        h.sm.assignment_revision(n),
                        rev,
                        "seed {seed} step {i}: {n}'s assignments changed without a wake-up"
                    );
                }
            }
            before = after;
        }
        assert!(names.len() > 20, "the sequence created instances");
    }
}
