//! Network-map deltas: what changed in a node's [`NetworkMap`] between the revision its agent
//! holds and the current one. The control plane remembers the last map it sent each node and
//! answers a long-poll that names that revision with a delta instead of the whole map
//! (O(changes) on the wire instead of O(instances in the node's networks)); anything else
//! (a restarted agent or server, another server, a lost answer, changed datapath settings)
//! gets the whole map.
//!
//! Granularity: remote endpoints and group members change one by one (they are the large,
//! churning parts); networks, groups (rules) and the node's own instances are replaced whole
//! when anything else about them changed. Both maps are in canonical order
//! (`nimbus_state::netmap::network_map`), and [`NetworkMap::apply`] restores it, so
//! `old.apply(&old.diff(&new))` is exactly `new`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::agent::{GroupPlan, InstancePlan, NetworkMap, NetworkPlan, RemoteEndpoint};

/// The changes from the map at `from` to the map at `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema, Default)]
pub struct NetworkMapDelta {
    /// Revision of the map the delta applies to.
    pub from: u64,
    /// Revision of the map it produces.
    pub to: u64,
    /// The peers' underlay addresses, when they changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<String>>,
    /// Networks added or changed other than in their remote endpoints (whole, with them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks: Vec<NetworkPlan>,
    /// Networks removed, by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub networks_removed: Vec<String>,
    /// Remote endpoints added, changed or removed, per network id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remotes: Vec<RemoteChange>,
    /// Groups added or whose rules changed (whole, with members).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupPlan>,
    /// Groups removed, by key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups_removed: Vec<String>,
    /// Members added or removed, per group key.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberChange>,
    /// The node's instances added or changed (whole).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances: Vec<InstancePlan>,
    /// The node's instances removed, by id.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub instances_removed: Vec<String>,
}

/// Remote endpoints of one network that changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RemoteChange {
    /// Network id.
    pub network: String,
    /// Endpoints added or changed (by address).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub upsert: Vec<RemoteEndpoint>,
    /// Addresses removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// Members of one group that changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MemberChange {
    /// Group key.
    pub group: String,
    /// Addresses added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<String>,
    /// Addresses removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// Why a delta does not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("network map delta from revision {from} does not apply to the map at revision {held}")]
pub struct DeltaMismatch {
    /// The revision the delta starts from.
    pub from: u64,
    /// The revision held.
    pub held: u64,
}

fn same_network_but_remotes(a: &NetworkPlan, b: &NetworkPlan) -> bool {
    a.id == b.id
        && a.project == b.project
        && a.name == b.name
        && a.vni == b.vni
        && a.cidr == b.cidr
        && a.subnets == b.subnets
}

impl NetworkMap {
    /// The delta from `self` to `new`; `None` when only a whole map can say it (the datapath
    /// settings or the node's underlay address changed).
    pub fn diff(&self, new: &NetworkMap) -> Option<NetworkMapDelta> {
        if self.prefix != new.prefix
            || self.mtu != new.mtu
            || self.vxlan_port != new.vxlan_port
            || self.underlay_ip != new.underlay_ip
        {
            return None;
        }
        let mut d = NetworkMapDelta {
            from: self.revision,
            to: new.revision,
            nodes: (self.nodes != new.nodes).then(|| new.nodes.clone()),
            ..NetworkMapDelta::default()
        };
        let old_nets: BTreeMap<&str, &NetworkPlan> =
            self.networks.iter().map(|n| (n.id.as_str(), n)).collect();
        let new_nets: BTreeMap<&str, &NetworkPlan> =
            new.networks.iter().map(|n| (n.id.as_str(), n)).collect();
        for (id, n) in &new_nets {
            match old_nets.get(id) {
                Some(o) if same_network_but_remotes(o, n) => {
                    let before: BTreeMap<&str, &RemoteEndpoint> =
                        o.remote.iter().map(|r| (r.ip.as_str(), r)).collect();
                    let after: BTreeMap<&str, &RemoteEndpoint> =
                        n.remote.iter().map(|r| (r.ip.as_str(), r)).collect();
                    let upsert: Vec<RemoteEndpoint> = after
                        .iter()
                        .filter(|(ip, r)| before.get(*ip) != Some(r))
                        .map(|(_, r)| (*r).clone())
                        .collect();
                    let remove: Vec<String> = before
                        .keys()
                        .filter(|ip| !after.contains_key(*ip))
                        .map(|ip| (*ip).to_string())
                        .collect();
                    if !upsert.is_empty() || !remove.is_empty() {
                        d.remotes.push(RemoteChange {
                            network: (*id).to_string(),
                            upsert,
                            remove,
                        });
                    }
                }
                _ => d.networks.push((*n).clone()),
            }
        }
        d.networks_removed = old_nets
            .keys()
            .filter(|id| !new_nets.contains_key(*id))
            .map(|id| (*id).to_string())
            .collect();
        let old_groups: BTreeMap<&str, &GroupPlan> = self
            .security_groups
            .iter()
            .map(|g| (g.key.as_str(), g))
            .collect();
        for g in &new.security_groups {
            match old_groups.get(g.key.as_str()) {
                Some(o) if o.rules == g.rules => {
                    let before: BTreeSet<&String> = o.members.iter().collect();
                    let after: BTreeSet<&String> = g.members.iter().collect();
                    let add: Vec<String> =
                        after.difference(&before).map(|m| (*m).clone()).collect();
                    let remove: Vec<String> =
                        before.difference(&after).map(|m| (*m).clone()).collect();
                    if !add.is_empty() || !remove.is_empty() {
                        d.members.push(MemberChange {
                            group: g.key.clone(),
                            add,
                            remove,
                        });
                    }
                }
                _ => d.groups.push(g.clone()),
            }
        }
        let new_groups: BTreeSet<&str> =
            new.security_groups.iter().map(|g| g.key.as_str()).collect();
        d.groups_removed = old_groups
            .keys()
            .filter(|k| !new_groups.contains(*k))
            .map(|k| (*k).to_string())
            .collect();
        let old_insts: BTreeMap<&str, &InstancePlan> =
            self.instances.iter().map(|i| (i.id.as_str(), i)).collect();
        let new_ids: BTreeSet<&str> = new.instances.iter().map(|i| i.id.as_str()).collect();
        d.instances = new
            .instances
            .iter()
            .filter(|i| old_insts.get(i.id.as_str()) != Some(i))
            .cloned()
            .collect();
        d.instances_removed = old_insts
            .keys()
            .filter(|id| !new_ids.contains(*id))
            .map(|id| (*id).to_string())
            .collect();
        Some(d)
    }

    /// Applies a delta made against this map's revision; on a mismatch the map is unchanged.
    pub fn apply(&mut self, d: &NetworkMapDelta) -> Result<(), DeltaMismatch> {
        if d.from != self.revision {
            return Err(DeltaMismatch {
                from: d.from,
                held: self.revision,
            });
        }
        self.revision = d.to;
        if let Some(n) = &d.nodes {
            self.nodes.clone_from(n);
        }
        let mut nets: BTreeMap<String, NetworkPlan> = std::mem::take(&mut self.networks)
            .into_iter()
            .map(|n| (n.id.clone(), n))
            .collect();
        for id in &d.networks_removed {
            nets.remove(id);
        }
        for n in &d.networks {
            nets.insert(n.id.clone(), n.clone());
        }
        for c in &d.remotes {
            if let Some(n) = nets.get_mut(&c.network) {
                let mut by_ip: BTreeMap<String, RemoteEndpoint> = std::mem::take(&mut n.remote)
                    .into_iter()
                    .map(|r| (r.ip.clone(), r))
                    .collect();
                for ip in &c.remove {
                    by_ip.remove(ip);
                }
                for r in &c.upsert {
                    by_ip.insert(r.ip.clone(), r.clone());
                }
                // Canonical order: by address.
                n.remote = by_ip.into_values().collect();
            }
        }
        let mut networks: Vec<NetworkPlan> = nets.into_values().collect();
        networks.sort_by(|a, b| (&a.project, &a.name).cmp(&(&b.project, &b.name)));
        self.networks = networks;
        let mut groups: BTreeMap<String, GroupPlan> = std::mem::take(&mut self.security_groups)
            .into_iter()
            .map(|g| (g.key.clone(), g))
            .collect();
        for k in &d.groups_removed {
            groups.remove(k);
        }
        for g in &d.groups {
            groups.insert(g.key.clone(), g.clone());
        }
        for c in &d.members {
            if let Some(g) = groups.get_mut(&c.group) {
                let mut m: BTreeSet<String> = std::mem::take(&mut g.members).into_iter().collect();
                for a in &c.remove {
                    m.remove(a);
                }
                m.extend(c.add.iter().cloned());
                g.members = m.into_iter().collect();
            }
        }
        self.security_groups = groups.into_values().collect();
        let mut insts: BTreeMap<String, InstancePlan> = std::mem::take(&mut self.instances)
            .into_iter()
            .map(|i| (i.id.clone(), i))
            .collect();
        for id in &d.instances_removed {
            insts.remove(id);
        }
        for i in &d.instances {
            insts.insert(i.id.clone(), i.clone());
        }
        self.instances = insts.into_values().collect();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::SubnetPlan;

    fn ep(ip: &str, node: &str) -> RemoteEndpoint {
        RemoteEndpoint {
            ip: ip.into(),
            mac: format!("0a:{ip}"),
            underlay_ip: node.into(),
        }
    }

    fn net(id: &str, name: &str, remote: Vec<RemoteEndpoint>) -> NetworkPlan {
        NetworkPlan {
            id: id.into(),
            project: "p".into(),
            name: name.into(),
            vni: 100,
            cidr: "10.0.0.0/24".into(),
            subnets: vec![SubnetPlan {
                cidr: "10.0.0.0/24".into(),
                gateway: "10.0.0.1".into(),
            }],
            remote,
        }
    }

    fn group(k: &str, members: &[&str]) -> GroupPlan {
        GroupPlan {
            key: k.into(),
            rules: Vec::new(),
            members: members.iter().map(|m| (*m).to_string()).collect(),
        }
    }

    fn inst(id: &str, ip: &str) -> InstancePlan {
        InstancePlan {
            id: id.into(),
            instance_type: crate::InstanceType::Container,
            network: "n1".into(),
            ip: ip.into(),
            mac: String::new(),
            groups: vec!["p/default".into()],
            publish: Vec::new(),
        }
    }

    fn map(rev: u64) -> NetworkMap {
        NetworkMap {
            revision: rev,
            prefix: "nb".into(),
            mtu: 1450,
            vxlan_port: 4789,
            underlay_ip: "192.0.2.1".into(),
            networks: vec![net("n1", "a", vec![ep("10.0.0.3", "192.0.2.2")])],
            security_groups: vec![group("p/default", &["10.0.0.2", "10.0.0.3"])],
            instances: vec![inst("i1", "10.0.0.2")],
            nodes: vec!["192.0.2.2".into()],
        }
    }

    #[test]
    fn a_delta_applied_to_the_old_map_gives_the_new_one() {
        let old = map(5);
        let mut new = map(9);
        new.networks[0].remote.push(ep("10.0.0.4", "192.0.2.3"));
        new.networks[0].remote[0].underlay_ip = "192.0.2.9".into();
        new.networks.insert(0, net("n0", "0first", vec![]));
        new.security_groups[0].members = vec!["10.0.0.2".into(), "10.0.0.4".into()];
        new.security_groups.push(group("p/web", &["10.0.0.9"]));
        new.instances.push(inst("i2", "10.0.0.5"));
        new.nodes = vec!["192.0.2.3".into(), "192.0.2.9".into()];
        let d = old.diff(&new).expect("a delta");
        assert_eq!(d.remotes.len(), 1);
        assert_eq!(d.remotes[0].upsert.len(), 2);
        assert_eq!(d.members[0].add, vec!["10.0.0.4".to_string()]);
        assert_eq!(d.members[0].remove, vec!["10.0.0.3".to_string()]);
        let mut got = old.clone();
        got.apply(&d).unwrap();
        assert_eq!(got, new);
        // And back again, removals included.
        let back = new.diff(&old).unwrap();
        assert_eq!(back.networks_removed, vec!["n0".to_string()]);
        assert_eq!(back.groups_removed, vec!["p/web".to_string()]);
        assert_eq!(back.instances_removed, vec!["i2".to_string()]);
        let mut got = new.clone();
        got.revision = 9;
        got.apply(&back).unwrap();
        assert_eq!(got, old);
    }

    #[test]
    fn a_delta_for_another_revision_changes_nothing() {
        let old = map(5);
        let d = old.diff(&map(9)).unwrap();
        let mut held = map(4);
        assert_eq!(held.apply(&d), Err(DeltaMismatch { from: 5, held: 4 }));
        assert_eq!(held, map(4));
    }

    #[test]
    fn changed_settings_need_the_whole_map() {
        let mut new = map(9);
        new.mtu = 1400;
        assert!(map(5).diff(&new).is_none());
    }

    #[test]
    fn an_unchanged_map_gives_an_empty_delta() {
        let d = map(5).diff(&map(5)).unwrap();
        assert_eq!(
            d,
            NetworkMapDelta {
                from: 5,
                to: 5,
                ..NetworkMapDelta::default()
            }
        );
    }
}
