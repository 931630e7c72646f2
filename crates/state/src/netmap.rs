//! What a node's datapath must look like, derived from the replicated state: the network
//! attachment of each assigned instance and the node's [`NetworkMap`] (networks with local
//! instances, remote endpoints for the VXLAN FDB, security groups, published ports).

use std::collections::{BTreeMap, BTreeSet};

use nimbus_api::agent::{
    GroupPlan, InstancePlan, NetworkAttachment, NetworkMap, NetworkPlan, RemoteEndpoint, SubnetPlan,
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

/// The network map of `node`.
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
    let net_keys: BTreeSet<String> = local
        .iter()
        .map(|i| key(&i.meta.project, &i.spec.network))
        .collect();
    for k in &net_keys {
        let Some(net) = sm.networks.get(k) else {
            continue;
        };
        let remote = sm
            .instances
            .values()
            .filter(|i| {
                i.meta.project == net.meta.project
                    && i.spec.network == net.meta.name
                    && i.spec.desired != DesiredState::Deleted
            })
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
    // Groups of local instances, then the groups their rules name.
    let mut group_keys: BTreeSet<String> = local
        .iter()
        .flat_map(|i| {
            i.spec
                .security_groups
                .iter()
                .map(|g| key(&i.meta.project, g))
        })
        .collect();
    let direct: Vec<String> = group_keys.iter().cloned().collect();
    for k in &direct {
        if let Some(g) = sm.security_groups.get(k) {
            for r in &g.rules {
                if let Some(peer) = &r.group {
                    group_keys.insert(key(&g.meta.project, peer));
                }
            }
        }
    }
    let mut members: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    let wanted: BTreeSet<&str> = group_keys.iter().map(String::as_str).collect();
    let keyed: Vec<(String, &Instance)> = sm
        .instances
        .values()
        .flat_map(|i| {
            i.spec
                .security_groups
                .iter()
                .map(move |g| (key(&i.meta.project, g), i))
        })
        .collect();
    for (k, i) in &keyed {
        if let (Some(w), Some(ip)) = (wanted.get(k.as_str()), &i.status.ip) {
            members.entry(w).or_default().push(ip.clone());
        }
    }
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
            let mut m = members.remove(k.as_str()).unwrap_or_default();
            m.sort();
            m.dedup();
            Some(GroupPlan {
                key: k.clone(),
                rules,
                members: m,
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
    let nodes = sm
        .nodes
        .values()
        .map(|n| n.underlay_ip.clone())
        .filter(|u| !u.is_empty() && *u != underlay)
        .collect::<BTreeSet<String>>()
        .into_iter()
        .collect();
    NetworkMap {
        nodes,
        revision: sm.network_revision,
        prefix: sm.network.prefix.clone(),
        mtu: sm.network.mtu,
        vxlan_port: sm.network.vxlan_port,
        underlay_ip: underlay,
        networks,
        security_groups,
        instances,
    }
}
