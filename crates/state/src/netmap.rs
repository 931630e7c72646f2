//! What a node's datapath must look like, derived from the replicated state: the network
//! attachment of each assigned instance and the node's [`NetworkMap`] (networks with local
//! instances, remote endpoints for the VXLAN FDB, security groups, published ports).

use std::collections::BTreeSet;

use nimbus_api::agent::{
    Assignment, AssignmentsResponse, GroupPlan, ImageRef, InstancePlan, NetworkAttachment,
    NetworkMap, NetworkPlan, RemoteEndpoint, SubnetPlan,
};
use nimbus_api::cidr::Cidr;
use nimbus_api::{bridge_name, instance_mac, DesiredState, Instance};

use crate::vpc::key;
use crate::StateMachine;

/// The network attachment of an instance (bridge, address, gateway, MAC, MTU), `None` if it
/// has no address or its network is gone.
pub fn attachment(sm: &StateMachine, inst: &Instance) -> Option<NetworkAttachment> {
    let ip = inst.status.ip.clone()?;
    let net = sm
        .networks
        .get(&key(&inst.meta.project, &inst.spec.network))?;
    let subnet = net
        .subnets
        .iter()
        .find(|s| s.name == inst.spec.subnet)
        .or_else(|| net.subnets.first())?;
    let cidr = Cidr::parse(&subnet.cidr).ok()?;
    Some(NetworkAttachment {
        bridge: bridge_name(&sm.network.prefix, net.vni),
        ip,
        prefix_len: cidr.prefix_len(),
        gateway: subnet.gateway.clone(),
        mac: instance_mac(&inst.meta.id),
        mtu: sm.network.mtu,
    })
}

/// The network map of `node`. Built from the indexes: O(the instances of the networks and
/// groups it shows). Canonical order (networks by project and name, remote endpoints by
/// address, groups by key, members sorted, instances by id), so equal states give equal maps
/// and a delta applied to the previous map gives exactly this one.
pub fn network_map(sm: &StateMachine, node: &str) -> NetworkMap {
    let underlay = sm
        .nodes
        .get(node)
        .map(|n| n.underlay_ip.clone())
        .unwrap_or_default();
    let underlay_of = |n: &str| {
        sm.nodes
            .get(n)
            .map(|n| n.underlay_ip.clone())
            .unwrap_or_default()
    };
    let local: Vec<&Instance> = sm
        .instances_on(node)
        .filter(|i| i.status.ip.is_some())
        .collect();
    let mut networks = Vec::new();
    let mut peers: BTreeSet<String> = BTreeSet::new();
    let (net_keys, group_keys) = sm.map_keys(node);
    for k in &net_keys {
        let Some(net) = sm.networks.get(k) else {
            continue;
        };
        let mut remote: Vec<RemoteEndpoint> = sm
            .network_instances(k)
            .filter(|i| i.spec.desired != DesiredState::Deleted)
            .filter_map(|i| {
                let n = i.status.node.as_deref()?;
                let u = underlay_of(n);
                // Nodes sharing this node's underlay address share its bridge (several agents
                // on one machine): their instances are local at L2.
                if n == node || u.is_empty() || u == underlay {
                    return None;
                }
                Some(RemoteEndpoint {
                    ip: i.status.ip.clone()?,
                    mac: instance_mac(&i.meta.id),
                    underlay_ip: u,
                })
            })
            .collect();
        remote.sort_by(|a, b| a.ip.cmp(&b.ip));
        peers.extend(remote.iter().map(|r| r.underlay_ip.clone()));
        networks.push(NetworkPlan {
            id: net.meta.id.clone(),
            project: net.meta.project.clone(),
            name: net.meta.name.clone(),
            vni: net.vni,
            cidr: net.cidr.clone(),
            subnets: net
                .subnets
                .iter()
                .map(|s| SubnetPlan {
                    cidr: s.cidr.clone(),
                    gateway: s.gateway.clone(),
                })
                .collect(),
            remote,
        });
    }
    networks.sort_by(|a, b| (&a.project, &a.name).cmp(&(&b.project, &b.name)));
    let security_groups = group_keys
        .iter()
        .filter_map(|k| {
            let g = sm.security_groups.get(k)?;
            let rules = g
                .rules
                .iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.group = r.group.map(|peer| key(&g.meta.project, &peer));
                    r
                })
                .collect();
            let mut members: Vec<String> = sm
                .group_instances(k)
                .filter_map(|i| i.status.ip.clone())
                .collect();
            members.sort();
            members.dedup();
            Some(GroupPlan {
                key: k.clone(),
                rules,
                members,
            })
        })
        .collect();
    let instances = local
        .iter()
        .filter_map(|i| {
            let net = sm.networks.get(&key(&i.meta.project, &i.spec.network))?;
            Some(InstancePlan {
                id: i.meta.id.clone(),
                instance_type: i.spec.instance_type,
                network: net.meta.id.clone(),
                ip: i.status.ip.clone()?,
                mac: instance_mac(&i.meta.id),
                groups: i
                    .spec
                    .security_groups
                    .iter()
                    .map(|g| key(&i.meta.project, g))
                    .collect(),
                publish: i.spec.publish.clone(),
            })
        })
        .collect();
    NetworkMap {
        // The peers: nodes hosting instances of this node's networks.
        nodes: peers.into_iter().collect(),
        revision: sm.network_revision(node),
        prefix: sm.network.prefix.clone(),
        mtu: sm.network.mtu,
        vxlan_port: sm.network.vxlan_port,
        underlay_ip: underlay,
        networks,
        security_groups,
        instances,
    }
}

impl StateMachine {
    /// The networks `node` hosts (those of its instances with an address) and the security
    /// groups its map shows (its instances' groups and the groups their rules name), as
    /// `project/name` keys.
    pub fn map_keys(&self, node: &str) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut nets = BTreeSet::new();
        let mut groups = BTreeSet::new();
        for i in self.instances_on(node).filter(|i| i.status.ip.is_some()) {
            nets.insert(key(&i.meta.project, &i.spec.network));
            groups.extend(
                i.spec
                    .security_groups
                    .iter()
                    .map(|g| key(&i.meta.project, g)),
            );
        }
        let direct: Vec<String> = groups.iter().cloned().collect();
        for k in &direct {
            if let Some(g) = self.security_groups.get(k) {
                for r in &g.rules {
                    if let Some(peer) = &r.group {
                        groups.insert(key(&g.meta.project, peer));
                    }
                }
            }
        }
        (nets, groups)
    }
}

/// A node's assignments (its instances with their images and attachments) and load
/// balancers; its network map too when `with_network` (agents that program a datapath).
pub fn assignments_of(sm: &StateMachine, node: &str, with_network: bool) -> AssignmentsResponse {
    let assignments = sm
        .instances_on(node)
        .filter_map(|i| {
            let image = sm
                .images
                .values()
                .find(|im| im.digest == i.spec.image_digest)?;
            // A backend draining out of its load balancers keeps running until it is out.
            let desired = sm.assigned_desired(i);
            let mut spec = i.spec.clone();
            spec.desired = desired;
            Some(Assignment {
                id: i.meta.id.clone(),
                name: i.meta.name.clone(),
                project: i.meta.project.clone(),
                generation: i.status.generation,
                desired,
                restart_nonce: i.spec.restart_nonce,
                spec,
                image: ImageRef {
                    name: image.meta.name.clone(),
                    digest: image.digest.clone(),
                    layers: image.layers.clone(),
                    default_command: image.default_command.clone(),
                    default_env: image.default_env.clone(),
                    working_dir: image.working_dir.clone(),
                },
                network: attachment(sm, i)?,
            })
        })
        .collect();
    AssignmentsResponse {
        revision: sm.assignment_revision(node),
        assignments,
        loadbalancers: sm.lb_assignments(node),
        network: with_network.then(|| network_map(sm, node)),
        network_delta: None,
        revoked_servers: Some(sm.pki.server_revocations()),
    }
}
