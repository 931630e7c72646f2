//! Builds scheduler inputs from the state.

use nimbus_api::{DesiredState, Instance, InstanceType, NodeState};
use nimbus_scheduler::{NodeView, Request, Resources};

use crate::StateMachine;

/// The resources an instance reserves.
pub fn resources(i: &Instance) -> Resources {
    Resources {
        cpu_millis: (i.spec.cpus * 1000.0).round() as u64,
        memory_bytes: i.spec.memory_bytes,
        disk_bytes: i.spec.disk_bytes,
    }
}

/// The scheduler request for an instance.
pub fn request(i: &Instance) -> Request {
    Request {
        resources: resources(i),
        vm: i.spec.instance_type == InstanceType::Vm,
    }
}

/// Scheduler views of all nodes; `exclude` is an instance whose own reservation is ignored
/// (when it is being re-placed). O(nodes): reservations come from the index.
pub fn node_views(sm: &StateMachine, exclude: Option<&str>) -> Vec<NodeView> {
    let excluded = exclude
        .and_then(|id| sm.instances.get(id))
        .and_then(|i| Some((i.status.node.as_deref()?, resources(i))));
    sm.nodes
        .values()
        .map(|n| {
            let (mut allocated, mut count) = sm
                .node_alloc(&n.meta.name)
                .map_or((Resources::default(), 0), |a| (a.reserved, a.count));
            if let Some((_, r)) = excluded.filter(|(node, _)| *node == n.meta.name) {
                allocated.cpu_millis -= r.cpu_millis;
                allocated.memory_bytes -= r.memory_bytes;
                allocated.disk_bytes -= r.disk_bytes;
                count -= 1;
            }
            NodeView {
                name: n.meta.name.clone(),
                ready: n.state == NodeState::Ready,
                cordoned: n.cordoned,
                vm_capable: n.capabilities.vms,
                container_capable: n.capabilities.containers,
                capacity: Resources {
                    cpu_millis: n.capacity.cpu_millis,
                    memory_bytes: n.capacity.memory_bytes,
                    disk_bytes: n.capacity.disk_bytes,
                },
                allocated,
                instance_count: count,
            }
        })
        .collect()
}

/// Full scheduler nodes (zone, labels, measured utilisation, spread-group counts) for the
/// placement engine.
pub fn nodes(sm: &StateMachine, exclude: Option<&str>) -> Vec<nimbus_scheduler::Node> {
    let excluded = exclude.and_then(|id| sm.instances.get(id)).and_then(|i| {
        let g = i.spec.spread_group.as_ref()?;
        (i.spec.desired != DesiredState::Deleted)
            .then(|| (i.status.node.clone(), format!("{}/{g}", i.meta.project)))
    });
    node_views(sm, exclude)
        .iter()
        .map(|v| {
            let mut n = nimbus_scheduler::Node::from(v);
            if let Some(node) = sm.nodes.get(&v.name) {
                n.zone.clone_from(&node.zone);
                n.labels.clone_from(&node.meta.labels);
                if let Some(u) = node.utilization {
                    n.measured = nimbus_scheduler::Utilization {
                        cpu: f64::from(u.cpu_permille.min(1000)) / 1000.0,
                        memory: f64::from(u.memory_permille.min(1000)) / 1000.0,
                        network: f64::from(u.network_permille.min(1000)) / 1000.0,
                    };
                    n.network_mbps = u.network_mbps;
                }
            }
            if let Some(a) = sm.node_alloc(&v.name) {
                n.groups.clone_from(&a.spread);
                if let Some((Some(node), g)) = &excluded {
                    if *node == v.name {
                        if let Some(c) = n.groups.get_mut(g) {
                            *c -= 1;
                            if *c == 0 {
                                n.groups.remove(g);
                            }
                        }
                    }
                }
            }
            n
        })
        .collect()
}

/// The full scheduler request of an instance; constraints were validated at the API.
pub fn instance_request(
    i: &Instance,
) -> Result<nimbus_scheduler::InstanceRequest, nimbus_api::ApiError> {
    let constraints = nimbus_scheduler::Constraint::parse_all(&i.spec.constraints)
        .map_err(|e| nimbus_api::ApiError::invalid(e.field, e.message))?;
    Ok(nimbus_scheduler::InstanceRequest {
        resources: resources(i),
        vm: i.spec.instance_type == InstanceType::Vm,
        network_mbps: 0,
        constraints,
        spread_group: i
            .spec
            .spread_group
            .as_ref()
            .map(|g| format!("{}/{g}", i.meta.project)),
        anti_affinity: i.spec.anti_affinity,
        priority: i.spec.priority,
    })
}
