//! Unit tests of the engine: filters, scoring, spread groups, batch, preemption, validation.

use super::*;

const GIB: u64 = 1 << 30;

fn node(name: &str, cpu: u64, mem: u64) -> NodeView {
    NodeView {
        name: name.into(),
        ready: true,
        cordoned: false,
        vm_capable: false,
        container_capable: true,
        capacity: Resources {
            cpu_millis: cpu,
            memory_bytes: mem,
            disk_bytes: 1 << 40,
        },
        allocated: Resources::default(),
        instance_count: 0,
    }
}

fn req(cpu: u64, mem: u64) -> Request {
    Request {
        resources: Resources {
            cpu_millis: cpu,
            memory_bytes: mem,
            disk_bytes: 1,
        },
        vm: false,
    }
}

fn full(name: &str, zone: &str, labels: &[(&str, &str)]) -> Node {
    Node {
        name: name.into(),
        zone: zone.into(),
        labels: labels
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect(),
        capacity: Resources {
            cpu_millis: 8000,
            memory_bytes: 16 * GIB,
            disk_bytes: 100 * GIB,
        },
        ..Node::default()
    }
}

fn ireq(cpu: u64, mem_gib: u64) -> InstanceRequest {
    InstanceRequest {
        resources: Resources {
            cpu_millis: cpu,
            memory_bytes: mem_gib * GIB,
            disk_bytes: GIB,
        },
        ..InstanceRequest::default()
    }
}

#[test]
fn spread_prefers_least_loaded_and_binpack_the_most() {
    let mut a = node("a", 4000, 8 << 30);
    a.allocated.memory_bytes = 4 << 30;
    let b = node("b", 4000, 8 << 30);
    let nodes = vec![a, b];
    assert_eq!(
        place(&nodes, &req(1000, 1 << 30), &Policy::default())
            .unwrap()
            .name,
        "b"
    );
    let bp = Policy {
        strategy: Strategy::Binpack,
        ..Policy::default()
    };
    assert_eq!(place(&nodes, &req(1000, 1 << 30), &bp).unwrap().name, "a");
}

#[test]
fn unschedulable_counts_reasons() {
    let mut c = node("c", 4000, 1 << 30);
    c.cordoned = true;
    let mut d = node("d", 4000, 1 << 30);
    d.ready = false;
    let nodes = vec![node("a", 4000, 1 << 30), node("b", 4000, 1 << 30), c, d];
    let e = place(&nodes, &req(1000, 2 << 30), &Policy::default()).unwrap_err();
    assert_eq!(e.reasons[&Reason::InsufficientMemory], 2);
    assert_eq!(e.reasons[&Reason::Cordoned], 1);
    let msg = e.to_string();
    assert!(
        msg.starts_with("0 of 4 nodes fit: 2 insufficient memory, 1 not ready, 1 cordoned"),
        "{msg}"
    );
    let vm = Request {
        vm: true,
        ..req(1, 1)
    };
    let e = place(&nodes[..2], &vm, &Policy::default()).unwrap_err();
    assert_eq!(e.reasons[&Reason::NoVmSupport], 2);
}

#[test]
fn cpu_overcommit() {
    let n = vec![node("a", 1000, 8 << 30)];
    assert!(place(&n, &req(4000, 1), &Policy::default()).is_ok());
    assert!(place(&n, &req(4001, 1), &Policy::default()).is_err());
}

#[test]
fn each_filter_reports_its_reason() {
    let p = Policy::default();
    let base = node("a", 4000, 8 * GIB);
    let check = |n: NodeView, r: Request, want: Option<Reason>| {
        assert_eq!(filter(&n, &r, &p), want, "{n:?} {r:?}");
    };
    check(base.clone(), req(1000, GIB), None);
    check(
        NodeView {
            ready: false,
            ..base.clone()
        },
        req(1, 1),
        Some(Reason::NotReady),
    );
    check(
        NodeView {
            cordoned: true,
            ..base.clone()
        },
        req(1, 1),
        Some(Reason::Cordoned),
    );
    check(
        base.clone(),
        Request {
            vm: true,
            ..req(1, 1)
        },
        Some(Reason::NoVmSupport),
    );
    check(
        NodeView {
            container_capable: false,
            vm_capable: true,
            ..base.clone()
        },
        req(1, 1),
        Some(Reason::NoContainerSupport),
    );
    check(
        NodeView {
            instance_count: 250,
            ..base.clone()
        },
        req(1, 1),
        Some(Reason::TooManyInstances),
    );
    check(base.clone(), req(16_001, 1), Some(Reason::InsufficientCpu));
    check(
        base.clone(),
        req(1, 9 * GIB),
        Some(Reason::InsufficientMemory),
    );
    let mut big_disk = req(1, 1);
    big_disk.resources.disk_bytes = (2 << 40) + 1;
    check(base, big_disk, Some(Reason::InsufficientDisk));
}

#[test]
fn host_reserve_and_overcommit_shrink_capacity() {
    let n = [full("a", "z", &[])]; // 8 CPU, 16 GiB, 100 GiB
    let policy = Policy {
        host_reserve: Resources {
            cpu_millis: 0,
            memory_bytes: 2 * GIB,
            disk_bytes: 0,
        },
        ..Policy::default()
    };
    let mut c = Cluster::new(&n, policy);
    assert_eq!(c.limits(0), [32_000, 14 * GIB, 200 * GIB]);
    assert!(c.fits(0, &ireq(1000, 14)));
    assert_eq!(
        c.reason(0, &ireq(1000, 15)),
        Some(Reason::InsufficientMemory)
    );
    let policy = Policy {
        memory_overcommit: 1.5,
        ..policy
    };
    let mut c = Cluster::new(&n, policy);
    assert!(c.fits(0, &ireq(1000, 21)));
}

#[test]
fn label_and_zone_constraints_filter() {
    let nodes = [
        full("a", "z1", &[("disk", "ssd"), ("tier", "batch")]),
        full("b", "z2", &[("disk", "hdd")]),
        full("c", "z3", &[("disk", "ssd")]),
    ];
    let mut c = Cluster::new(&nodes, Policy::default());
    let with = |cs: &[&str]| InstanceRequest {
        constraints: Constraint::parse_all(cs).unwrap(),
        ..ireq(100, 1)
    };
    assert_eq!(c.place(&with(&["disk=ssd", "tier!=batch"])).unwrap(), 2);
    assert_eq!(
        c.place(&with(&["zone in (z1, z2)", "disk=hdd"])).unwrap(),
        1
    );
    let e = c.place(&with(&["disk=ssd", "zone=z2"])).unwrap_err();
    assert_eq!(e.reasons[&Reason::ZoneMismatch], 2);
    assert_eq!(e.reasons[&Reason::ConstraintMismatch], 1);
    assert!(e
        .to_string()
        .starts_with("0 of 3 nodes fit: 2 zone mismatch, 1 constraint mismatch"));
}

#[test]
fn weighted_score_follows_weights_and_measured_load() {
    let mut a = full("a", "z", &[]);
    a.network_mbps = 10_000;
    a.measured = Utilization {
        cpu: 0.1,
        memory: 0.1,
        network: 0.9,
    };
    let mut b = full("b", "z", &[]);
    b.network_mbps = 10_000;
    b.allocated.cpu_millis = 19_200; // 60% of the 32-CPU limit
    b.measured = Utilization {
        cpu: 0.0,
        memory: 0.1,
        network: 0.1,
    };
    let nodes = [a, b];
    let mut c = Cluster::new(&nodes, Policy::default());
    let r = InstanceRequest {
        network_mbps: 1000,
        ..ireq(1000, 1)
    };
    // load: a = (0.1, 0.1, 0.9), b = (0.6, 0.1, 0.1); default weights 0.4/0.4/0.2.
    let sa = c.score(0, &r);
    let sb = c.score(1, &r);
    let expect_a = 0.4 * (0.1 + 1000.0 / 32_000.0) + 0.4 * (0.1 + 1.0 / 16.0) + 0.2 * (0.9 + 0.1);
    assert!((sa - expect_a).abs() < 1e-9, "{sa} {expect_a}");
    assert!(sa < sb);
    assert_eq!(c.place(&r).unwrap(), 0);
    // Network surge: the adaptive law raises the network weight and the choice flips.
    let mut adaptive = AdaptiveWeights::new(Policy::default().weights, AdaptiveConfig::default());
    let surge = Pressure {
        cpu: 0.3,
        memory: 0.1,
        network: 0.9,
    };
    for _ in 0..6 {
        c.set_weights(adaptive.update(surge));
    }
    assert!(c.weights().network > 0.7, "{:?}", c.weights());
    assert_eq!(c.place(&r).unwrap(), 1);
}

#[test]
fn binpack_fills_used_nodes_and_opens_the_largest() {
    let mut small = full("a-small", "z", &[]);
    small.capacity.memory_bytes = 8 * GIB;
    let mut big = full("b-big", "z", &[]);
    big.capacity.memory_bytes = 64 * GIB;
    let nodes = [small, big];
    let policy = Policy {
        strategy: Strategy::Binpack,
        ..Policy::default()
    };
    let mut c = Cluster::new(&nodes, policy);
    // Empty cluster: open the largest node.
    assert_eq!(c.place_and_commit(&ireq(100, 4)).unwrap(), 1);
    // Keep filling it while it fits.
    for _ in 0..14 {
        assert_eq!(c.place_and_commit(&ireq(100, 4)).unwrap(), 1);
    }
    assert_eq!(c.place_and_commit(&ireq(100, 8)).unwrap(), 0);
}

#[test]
fn spread_group_spreads_across_zones_then_nodes() {
    let nodes = [
        full("a1", "a", &[]),
        full("a2", "a", &[]),
        full("b1", "b", &[]),
        full("c1", "c", &[]),
    ];
    let mut c = Cluster::new(&nodes, Policy::default());
    let r = InstanceRequest {
        spread_group: Some("web".into()),
        ..ireq(100, 1)
    };
    let mut zones = Vec::new();
    for _ in 0..6 {
        let i = c.place_and_commit(&r).unwrap();
        zones.push(c.zone(i).to_string());
    }
    for z in ["a", "b", "c"] {
        assert_eq!(zones.iter().filter(|x| *x == z).count(), 2, "{zones:?}");
    }
    assert_eq!(
        c.group_zone_counts("web"),
        vec![("a", 2), ("b", 2), ("c", 2)]
    );
    // In zone a the two members went to different nodes.
    assert_eq!(c.instance_count(0), 1);
    assert_eq!(c.instance_count(1), 1);
}

#[test]
fn hard_anti_affinity_filters_nodes_with_members() {
    let nodes = [full("a", "z", &[]), full("b", "z", &[])];
    let mut c = Cluster::new(&nodes, Policy::default());
    let r = InstanceRequest {
        spread_group: Some("db".into()),
        anti_affinity: true,
        ..ireq(100, 1)
    };
    c.place_and_commit(&r).unwrap();
    c.place_and_commit(&r).unwrap();
    let e = c.place(&r).unwrap_err();
    assert_eq!(e.reasons[&Reason::AntiAffinity], 2);
    // Soft spread alone still places a third member.
    let soft = InstanceRequest {
        anti_affinity: false,
        ..r
    };
    assert!(c.place(&soft).is_ok());
}

#[test]
fn existing_group_members_count() {
    let mut a = full("a", "z1", &[]);
    a.groups.insert("web".into(), 3);
    let nodes = [a, full("b", "z2", &[])];
    let mut c = Cluster::new(
        &nodes,
        Policy {
            strategy: Strategy::Binpack,
            ..Policy::default()
        },
    );
    let r = InstanceRequest {
        spread_group: Some("web".into()),
        ..ireq(100, 1)
    };
    assert_eq!(c.place(&r).unwrap(), 1);
}

#[test]
fn cordon_and_max_instances() {
    let nodes = [full("a", "z", &[]), full("b", "z", &[])];
    let mut c = Cluster::new(
        &nodes,
        Policy {
            max_instances_per_node: 1,
            ..Policy::default()
        },
    );
    c.set_cordoned(1, true);
    assert_eq!(c.place_and_commit(&ireq(1, 1)).unwrap(), 0);
    let e = c.place(&ireq(1, 1)).unwrap_err();
    assert_eq!(e.reasons[&Reason::TooManyInstances], 1);
    assert_eq!(e.reasons[&Reason::Cordoned], 1);
    c.set_cordoned(1, false);
    assert_eq!(c.place(&ireq(1, 1)).unwrap(), 1);
}

#[test]
fn batch_spreads_across_zones_and_is_all_or_nothing() {
    let nodes: Vec<Node> = (0..6)
        .map(|i| full(&format!("n{i}"), ["a", "b", "c"][i % 3], &[]))
        .collect();
    let mut c = Cluster::new(&nodes, Policy::default());
    let got = c.place_batch(&ireq(1000, 4), 9).unwrap();
    let mut per_zone = [0; 3];
    for &i in &got {
        per_zone[c.zone_index(i)] += 1;
    }
    assert_eq!(per_zone, [3, 3, 3]);
    // 6 nodes × 16 GiB hold 24 × 4 GiB; 9 are placed, so 15 more fit but 16 do not.
    let before: Vec<_> = (0..6).map(|i| c.allocated(i)).collect();
    let e = c.place_batch(&ireq(1000, 4), 16).unwrap_err();
    assert_eq!((e.placed, e.requested), (15, 16));
    let after: Vec<_> = (0..6).map(|i| c.allocated(i)).collect();
    assert_eq!(before, after, "a failed batch leaves nothing committed");
    assert!(c.place_batch(&ireq(1000, 4), 15).is_ok());
}

#[test]
fn fast_path_agrees_with_explaining_path() {
    let nodes = sim::generate_nodes(3, 300, 3);
    let work = sim::generate_workload(4, 3000, &nodes, 3, f64::INFINITY);
    let mut c = Cluster::new(&nodes, Policy::default());
    for w in &work {
        let r = &w.request;
        if let Some(i) = c.try_place(r) {
            assert_eq!(c.reason(i, r), None);
            c.commit(i, r);
        } else {
            let u = c.unschedulable(r);
            assert_eq!(u.reasons.values().sum::<usize>(), c.len(), "{u}");
        }
    }
}

#[test]
fn preemption_picks_the_minimal_victim_set() {
    let mut a = full("a", "z", &[]); // 16 GiB
    a.allocated.memory_bytes = 16 * GIB;
    a.instance_count = 4;
    let mut b = full("b", "z", &[]);
    b.allocated.memory_bytes = 16 * GIB;
    b.instance_count = 3;
    let nodes = [a, b];
    let inst = |id: &str, prio: i32, gib: u64| RunningInstance {
        id: id.into(),
        priority: prio,
        resources: Resources {
            cpu_millis: 100,
            memory_bytes: gib * GIB,
            disk_bytes: 0,
        },
    };
    // Node a: four 4 GiB instances at priority 0 -> needs two victims for 8 GiB.
    // Node b: 8 GiB at 0, 4 GiB at -100, 4 GiB at 0 -> one victim (the 8 GiB) suffices.
    let instances = vec![
        vec![
            inst("a0", 0, 4),
            inst("a1", 0, 4),
            inst("a2", 0, 4),
            inst("a3", 0, 4),
        ],
        vec![inst("b0", -100, 4), inst("b1", 0, 8), inst("b2", 0, 4)],
    ];
    let r = InstanceRequest {
        priority: 100,
        ..ireq(100, 8)
    };
    let plan = plan_preemption(&nodes, &instances, &r, &Policy::default()).unwrap();
    assert_eq!(
        plan,
        PreemptionPlan {
            node: 1,
            victims: vec![1]
        }
    );
    // Needing 12 GiB: a needs 3 (total prio 0), b needs 2 (b0 + b1, total prio -100).
    let r = InstanceRequest {
        priority: 100,
        ..ireq(100, 12)
    };
    let plan = plan_preemption(&nodes, &instances, &r, &Policy::default()).unwrap();
    assert_eq!(
        plan,
        PreemptionPlan {
            node: 1,
            victims: vec![0, 1]
        }
    );
    // Equal-priority instances are never victims (b0 is the only one below 0).
    let r = InstanceRequest {
        priority: 0,
        ..ireq(100, 8)
    };
    assert_eq!(
        plan_preemption(&nodes, &instances, &r, &Policy::default()),
        None
    );
    let r = InstanceRequest {
        priority: -100,
        ..ireq(100, 4)
    };
    assert_eq!(
        plan_preemption(&nodes, &instances, &r, &Policy::default()),
        None
    );
    // Among equal-size sets, the lowest total priority wins.
    let instances = vec![
        vec![
            inst("a0", 50, 4),
            inst("a1", 50, 4),
            inst("a2", 0, 4),
            inst("a3", 0, 4),
        ],
        vec![inst("b0", 10, 8), inst("b1", 20, 4), inst("b2", 20, 4)],
    ];
    let r = InstanceRequest {
        priority: 100,
        ..ireq(100, 8)
    };
    let plan = plan_preemption(&nodes, &instances, &r, &Policy::default()).unwrap();
    assert_eq!(
        plan,
        PreemptionPlan {
            node: 1,
            victims: vec![0]
        }
    );
}

#[test]
fn preemption_greedy_fallback_for_large_sets() {
    let mut a = full("a", "z", &[]);
    a.allocated.memory_bytes = 16 * GIB;
    a.instance_count = 16;
    let instances = vec![(0..16)
        .map(|k| RunningInstance {
            id: format!("i{k}"),
            priority: if k < 8 { -1 } else { 0 },
            resources: Resources {
                cpu_millis: 10,
                memory_bytes: GIB,
                disk_bytes: 0,
            },
        })
        .collect::<Vec<_>>()];
    let r = InstanceRequest {
        priority: 5,
        ..ireq(100, 5)
    };
    let plan = plan_preemption(&[a], &instances, &r, &Policy::default()).unwrap();
    assert_eq!(
        plan.victims,
        vec![0, 1, 2, 3, 4],
        "five lowest-priority 1 GiB victims"
    );
}

#[test]
fn priority_classes_resolve_or_error() {
    let pc = PriorityClasses::default();
    assert_eq!(pc.resolve("high").unwrap(), 100);
    let e = pc.resolve("urgent").unwrap_err();
    assert_eq!(e.field, "priority_class");
    assert!(e.message.contains("urgent"));
}

#[test]
fn policy_validation_names_the_field() {
    assert!(Policy::default().validate().is_ok());
    let field = |p: Policy| p.validate().unwrap_err().field;
    let d = Policy::default();
    assert_eq!(
        field(Policy {
            cpu_overcommit: 0.5,
            ..d
        }),
        "cpu_overcommit"
    );
    assert_eq!(
        field(Policy {
            memory_overcommit: f64::NAN,
            ..d
        }),
        "memory_overcommit"
    );
    assert_eq!(
        field(Policy {
            disk_overcommit: 0.99,
            ..d
        }),
        "disk_overcommit"
    );
    assert_eq!(
        field(Policy {
            max_instances_per_node: 0,
            ..d
        }),
        "max_instances_per_node"
    );
    let w = |cpu, memory, network| Policy {
        weights: Weights {
            cpu,
            memory,
            network,
        },
        ..d
    };
    assert_eq!(field(w(-0.1, 0.5, 0.5)), "weights.cpu");
    assert_eq!(field(w(0.5, 0.5, f64::INFINITY)), "weights.network");
    assert_eq!(field(w(0.0, 0.0, 0.0)), "weights");
    let e = w(0.0, 0.0, 0.0).validate().unwrap_err();
    assert_eq!(
        e.to_string(),
        "invalid weights: at least one weight must be positive"
    );
}

#[test]
fn request_validation_names_the_field() {
    let nodes = [
        full("a", "z1", &[("disk", "ssd")]),
        full("b", "z2", &[("disk", "hdd")]),
    ];
    let c = Cluster::new(&nodes, Policy::default());
    let v = |cs: &[&str]| {
        c.validate_request(&InstanceRequest {
            constraints: Constraint::parse_all(cs).unwrap(),
            ..ireq(1, 1)
        })
    };
    assert!(v(&["disk=ssd", "zone in (z1,z2)"]).is_ok());
    let e = v(&["disk=ssd", "gpu=true"]).unwrap_err();
    assert_eq!(e.field, "constraints[1]");
    assert!(e.message.contains("no node has a label \"gpu\""), "{e}");
    let e = v(&["zone=z9"]).unwrap_err();
    assert_eq!(e.field, "constraints[0]");
    assert!(e.message.contains("unknown zone \"z9\""), "{e}");
    let e = v(&["disk=ssd", "disk=hdd"]).unwrap_err();
    assert_eq!(e.field, "constraints[1]");
    assert!(e.message.contains("contradicts constraints[0]"), "{e}");
    let e = v(&["disk=ssd", "zone=z2"]).unwrap_err();
    assert_eq!(e.field, "constraints");
    assert!(e.message.starts_with("unsatisfiable"), "{e}");
    let e = c
        .validate_request(&InstanceRequest {
            anti_affinity: true,
            ..ireq(1, 1)
        })
        .unwrap_err();
    assert_eq!(e.field, "anti_affinity");
}

#[test]
fn simulation_is_deterministic_and_sane() {
    let nodes = sim::generate_nodes(1, 200, 3);
    let work = sim::generate_workload(2, 4000, &nodes, 3, 0.7);
    let run = |algo| {
        let mut s = sim::Simulation::new(&nodes, Policy::default(), work.clone(), algo, 9);
        s.run();
        s.report()
    };
    for algo in sim::Algorithm::ALL {
        let a = run(algo);
        assert_eq!(a, run(algo));
        assert!(a.placed > 3000, "{algo:?} {a:?}");
        assert!(a.nodes_used >= a.lower_bound);
    }
}

#[test]
fn index_agrees_with_linear_scan() {
    for (strategy, seed) in [(Strategy::Spread, 5), (Strategy::Binpack, 6)] {
        let nodes = sim::generate_nodes(seed, 500, 3);
        let work = sim::generate_workload(seed, 20_000, &nodes, 3, 0.8);
        let policy = Policy {
            strategy,
            ..Policy::default()
        };
        let mut a =
            sim::Simulation::new(&nodes, policy, work.clone(), sim::Algorithm::FullScore, 1);
        let mut b = sim::Simulation::new(&nodes, policy, work, sim::Algorithm::FullScan, 1);
        let mut n = 0;
        loop {
            a.depart();
            b.depart();
            let (x, y) = (a.decide(), b.decide());
            assert_eq!(x, y, "{strategy:?} decision {n}");
            if x.is_none() {
                break;
            }
            n += 1;
        }
        assert_eq!(a.report(), b.report());
    }
}

#[test]
fn index_handles_identical_nodes_and_ties_by_name() {
    let nodes: Vec<Node> = (0..64)
        .rev()
        .map(|i| full(&format!("n{i:02}"), "z", &[]))
        .collect();
    for strategy in [Strategy::Spread, Strategy::Binpack] {
        let mut c = Cluster::new(
            &nodes,
            Policy {
                strategy,
                ..Policy::default()
            },
        );
        let i = c.try_place(&ireq(100, 1)).unwrap();
        assert_eq!(c.name(i), "n00");
        assert_eq!(c.try_place_linear(&ireq(100, 1)), Some(i));
    }
}

#[test]
fn preemption_frees_an_instance_slot_and_skips_filtered_nodes() {
    let mut a = full("a", "z", &[]);
    a.instance_count = 2;
    let mut b = full("b", "z", &[]);
    b.instance_count = 2;
    b.cordoned = true;
    let policy = Policy {
        max_instances_per_node: 2,
        ..Policy::default()
    };
    let small = |id: &str, prio| RunningInstance {
        id: id.into(),
        priority: prio,
        resources: Resources {
            cpu_millis: 100,
            memory_bytes: GIB,
            disk_bytes: 0,
        },
    };
    let instances = vec![
        vec![small("a0", 0), small("a1", -5)],
        vec![small("b0", -100)],
    ];
    let r = InstanceRequest {
        priority: 10,
        ..ireq(100, 1)
    };
    let plan = plan_preemption(&[a, b], &instances, &r, &policy).unwrap();
    assert_eq!(
        plan,
        PreemptionPlan {
            node: 0,
            victims: vec![1]
        },
        "b is cordoned"
    );
}

#[test]
fn pressure_is_mean_load_of_schedulable_nodes() {
    let mut a = full("a", "z", &[]);
    a.allocated.memory_bytes = 8 * GIB; // half of 16 GiB
    a.network_mbps = 1000;
    a.measured = Utilization {
        cpu: 0.2,
        memory: 0.1,
        network: 0.6,
    };
    let mut b = full("b", "z", &[]);
    b.cordoned = true;
    b.measured.cpu = 1.0;
    let c = Cluster::new(&[a, b], Policy::default());
    let p = c.pressure();
    assert!((p.cpu - 0.2).abs() < 1e-9 && (p.memory - 0.5).abs() < 1e-9);
    assert!((p.network - 0.6).abs() < 1e-9);
}
