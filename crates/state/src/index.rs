//! Derived indexes of the replicated state and the change sets they yield.
//!
//! The indexes (instances by project and name, by node, by network and by security group,
//! network and group hosts per node, pending instances, each node's reserved resources and
//! spread-group counts) are never serialized: they are rebuilt when a state is loaded and
//! brought up to date after every applied command from what the command changed
//! ([`crate::tracked::Tracked`] remembers each changed entry's prior value), so reads and
//! placements cost O(what they look at), not O(instances).
//!
//! The same comparison decides which agents to wake ([`StateMachine::settle`]): a node's
//! assignment revision moves when one of its instances' assignments changed or a load
//! balancer it serves changed (its spec or placement, or the set of running instances its
//! selectors pick); its network revision moves when its network map can have changed (an
//! instance joined, left or moved in a network it hosts, a security group its instances use
//! or reference changed members or rules, a peer's underlay address changed). Nothing else is
//! woken. `woken_network_maps_match_the_maps_that_changed` (tests) checks that every map that
//! changes is woken.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use nimbus_api::lb::{LbBackends, LoadBalancer};
use nimbus_api::{DesiredState, Instance, InstanceState, Node, PublishedPort};
use nimbus_scheduler::Resources;

use crate::machine::StateMachine;
use crate::vpc::key;

/// An instance id shared by the index sets.
pub type Id = Arc<str>;

/// Reservations on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeAlloc {
    /// Resources reserved by the instances placed on the node.
    pub reserved: Resources,
    /// Instances placed on it.
    pub count: u32,
    /// Members per spread group (`project/group`).
    pub spread: BTreeMap<String, u32>,
}

/// The derived indexes.
#[derive(Debug, Clone, Default)]
pub struct Index {
    /// `(project, name)` -> id, in order (list pages, lookups by name).
    pub(crate) by_name: BTreeMap<(String, String), Id>,
    /// Node -> instances placed on it.
    pub(crate) by_node: HashMap<String, BTreeSet<Id>>,
    /// Network key -> its instances.
    pub(crate) by_network: HashMap<String, BTreeSet<Id>>,
    /// Security group key -> its instances that have an address.
    pub(crate) by_group: HashMap<String, BTreeSet<Id>>,
    /// Network key -> node -> instances with an address placed there.
    pub(crate) net_hosts: HashMap<String, BTreeMap<String, u32>>,
    /// Security group key -> node -> member instances with an address placed there.
    pub(crate) group_hosts: HashMap<String, BTreeMap<String, u32>>,
    /// Instances waiting for a placement.
    pub(crate) pending: BTreeSet<Id>,
    /// Network key -> the addresses its instances hold (IPAM: an address is taken while an
    /// instance holds it and free once it is gone, so the allocations are derived).
    pub(crate) ips: HashMap<String, BTreeSet<u32>>,
    /// Node -> reservations.
    pub(crate) alloc: HashMap<String, NodeAlloc>,
    /// The placement engine kept warm (see `engine.rs`).
    pub(crate) engine: crate::engine::EngineSlot,
}

fn inc(m: &mut BTreeMap<String, u32>, k: &str) {
    *m.entry(k.to_string()).or_default() += 1;
}

fn dec(m: &mut BTreeMap<String, u32>, k: &str) {
    if let Some(c) = m.get_mut(k) {
        *c -= 1;
        if *c == 0 {
            m.remove(k);
        }
    }
}

fn set_remove<K: std::hash::Hash + Eq>(m: &mut HashMap<K, BTreeSet<Id>>, k: &K, id: &str) {
    if let Some(s) = m.get_mut(k) {
        s.remove(id);
        if s.is_empty() {
            m.remove(k);
        }
    }
}

/// Whether an instance waits for a placement.
pub fn is_pending(i: &Instance) -> bool {
    i.status.node.is_none()
        && i.status.state == InstanceState::Pending
        && i.spec.desired != DesiredState::Deleted
}

impl Index {
    /// Adds (`sign` true) or removes an instance's contributions.
    fn account(&mut self, i: &Instance, add: bool) {
        let id: &str = &i.meta.id;
        let shared: Id = Arc::from(id);
        let name = (i.meta.project.clone(), i.meta.name.clone());
        let net = key(&i.meta.project, &i.spec.network);
        let groups: Vec<String> = i
            .spec
            .security_groups
            .iter()
            .map(|g| key(&i.meta.project, g))
            .collect();
        let placed_ip = i.status.node.as_deref().filter(|_| i.status.ip.is_some());
        let addr = i
            .status
            .ip
            .as_deref()
            .and_then(|a| a.parse::<std::net::Ipv4Addr>().ok())
            .map(u32::from);
        if let Some(a) = addr {
            let set = self.ips.entry(net.clone()).or_default();
            if add {
                set.insert(a);
            } else {
                set.remove(&a);
                if set.is_empty() {
                    self.ips.remove(&net);
                }
            }
        }
        if add {
            self.by_name.insert(name, shared.clone());
            if let Some(n) = &i.status.node {
                self.by_node
                    .entry(n.clone())
                    .or_default()
                    .insert(shared.clone());
            }
            self.by_network
                .entry(net.clone())
                .or_default()
                .insert(shared.clone());
            if i.status.ip.is_some() {
                for g in &groups {
                    self.by_group
                        .entry(g.clone())
                        .or_default()
                        .insert(shared.clone());
                }
            }
            if let Some(n) = placed_ip {
                inc(self.net_hosts.entry(net).or_default(), n);
                for g in &groups {
                    inc(self.group_hosts.entry(g.clone()).or_default(), n);
                }
            }
            if is_pending(i) {
                self.pending.insert(shared);
            }
        } else {
            if self.by_name.get(&name).is_some_and(|v| &**v == id) {
                self.by_name.remove(&name);
            }
            if let Some(n) = &i.status.node {
                set_remove(&mut self.by_node, n, id);
            }
            set_remove(&mut self.by_network, &net, id);
            for g in &groups {
                set_remove(&mut self.by_group, g, id);
            }
            if let Some(n) = placed_ip {
                if let Some(h) = self.net_hosts.get_mut(&net) {
                    dec(h, n);
                    if h.is_empty() {
                        self.net_hosts.remove(&net);
                    }
                }
                for g in &groups {
                    if let Some(h) = self.group_hosts.get_mut(g) {
                        dec(h, n);
                        if h.is_empty() {
                            self.group_hosts.remove(g);
                        }
                    }
                }
            }
            self.pending.remove(id);
        }
        self.account_reservation(i, add);
    }

    /// Reservations follow `placement::node_views`: an instance reserves on its node unless
    /// it is being deleted without a node; it counts in its spread group unless being deleted.
    fn account_reservation(&mut self, i: &Instance, add: bool) {
        let Some(node) = &i.status.node else {
            return;
        };
        let a = self.alloc.entry(node.clone()).or_default();
        let r = crate::placement::resources(i);
        if add {
            a.reserved.cpu_millis += r.cpu_millis;
            a.reserved.memory_bytes += r.memory_bytes;
            a.reserved.disk_bytes += r.disk_bytes;
            a.count += 1;
        } else {
            a.reserved.cpu_millis -= r.cpu_millis;
            a.reserved.memory_bytes -= r.memory_bytes;
            a.reserved.disk_bytes -= r.disk_bytes;
            a.count -= 1;
        }
        if i.spec.desired != DesiredState::Deleted {
            if let Some(g) = &i.spec.spread_group {
                let g = format!("{}/{g}", i.meta.project);
                if add {
                    inc(&mut a.spread, &g);
                } else {
                    dec(&mut a.spread, &g);
                }
            }
        }
        if a.count == 0 {
            self.alloc.remove(node);
        }
    }

    /// Builds the indexes of `instances`.
    pub fn build<'a>(instances: impl Iterator<Item = &'a Instance>) -> Self {
        let mut ix = Self::default();
        for i in instances {
            ix.account(i, true);
        }
        ix
    }
}

/// What of an instance its node's network map shows (locally or to its network's peers).
#[derive(PartialEq)]
struct NetFacts<'a> {
    node: Option<&'a str>,
    network: &'a str,
    subnet: &'a str,
    ip: Option<&'a str>,
    groups: &'a [String],
    deleted: bool,
    publish: &'a [PublishedPort],
    vm: bool,
}

impl<'a> NetFacts<'a> {
    fn of(i: &'a Instance) -> Self {
        Self {
            node: i.status.node.as_deref(),
            network: &i.spec.network,
            subnet: &i.spec.subnet,
            ip: i.status.ip.as_deref(),
            groups: &i.spec.security_groups,
            deleted: i.spec.desired == DesiredState::Deleted,
            publish: &i.spec.publish,
            vm: i.spec.instance_type == nimbus_api::InstanceType::Vm,
        }
    }
}

/// What of an instance its node's assignment shows.
fn assignment_changed(a: &Instance, b: &Instance) -> bool {
    a.spec != b.spec
        || a.status.node != b.status.node
        || a.status.generation != b.status.generation
        || a.status.ip != b.status.ip
        || a.meta.name != b.meta.name
}

/// What of an instance a load balancer's backends show.
fn backend_changed(a: &Instance, b: &Instance) -> bool {
    (a.status.state == InstanceState::Running) != (b.status.state == InstanceState::Running)
        || a.status.ip != b.status.ip
        || a.meta.labels != b.meta.labels
        || a.meta.name != b.meta.name
        || a.spec.spread_group != b.spec.spread_group
        || a.spec.desired != b.spec.desired
}

/// Whether a backend selector picks an instance (running or not).
pub fn selects(b: &LbBackends, i: &Instance) -> bool {
    if let Some(sel) = &b.label {
        let (k, v) = sel.split_once('=').unwrap_or((sel, ""));
        i.meta.labels.get(k).map(String::as_str) == Some(v)
    } else if let Some(g) = &b.group {
        i.spec.spread_group.as_deref() == Some(g.as_str())
    } else {
        b.instances.iter().any(|r| r.name == i.meta.name)
    }
}

/// Whether a load balancer picks `i` (running or not) for its default pool or a route.
pub(crate) fn lb_selects(lb: &LoadBalancer, i: &Instance) -> bool {
    lb.meta.project == i.meta.project
        && (selects(&lb.spec.backends, i) || lb.spec.routes.iter().any(|r| selects(&r.backends, i)))
}

fn underlay_changed(a: Option<&Node>, b: Option<&Node>) -> bool {
    a.map(|n| &n.underlay_ip) != b.map(|n| &n.underlay_ip)
}

impl StateMachine {
    /// Rebuilds the indexes from the state (after loading it).
    pub(crate) fn rebuild_index(&mut self) {
        let ix = Index::build(self.instances.values().map(|i| &**i));
        self.index = ix;
        // Whatever was remembered belongs to the state before the load.
        let _ = self.data.instances.take_changes();
        let _ = self.data.nodes.take_changes();
        let _ = self.data.networks.take_changes();
        let _ = self.data.security_groups.take_changes();
        let _ = self.data.loadbalancers.take_changes();
    }

    /// After a command: brings the indexes up to date with what it changed and moves the
    /// revisions of what its agents see (see the module docs): O(what changed), whatever
    /// the number of nodes hosting a network.
    pub(crate) fn settle(&mut self) {
        let instances = self.data.instances.take_changes();
        let groups_changed = self.data.security_groups.take_changes();
        let networks_changed = self.data.networks.take_changes();
        let nodes_changed = self.data.nodes.take_changes();
        let lbs_changed = self.data.loadbalancers.take_changes();

        // Keys touched by a command that changed nothing (or was refused) do not count.
        let mut nets: BTreeSet<String> = networks_changed
            .into_iter()
            .filter(|(k, before)| before.as_ref() != self.data.networks.get(k))
            .map(|(k, _)| k)
            .collect();
        let mut groups: BTreeSet<String> = groups_changed
            .into_iter()
            .filter(|(k, before)| before.as_ref() != self.data.security_groups.get(k))
            .map(|(k, _)| k)
            .collect();
        let mut map_nodes: BTreeSet<String> = BTreeSet::new();
        let mut assignment_nodes: BTreeSet<String> = BTreeSet::new();
        let mut lbs: BTreeSet<String> = BTreeSet::new();

        for (id, before) in &instances {
            let after = self.data.instances.get(id).map(|i| &**i);
            let before = before.as_deref();
            if before == after {
                continue;
            }
            let views = [before, after];
            let facts = views.map(|v| v.map(NetFacts::of));
            if facts[0] != facts[1] {
                for i in views.into_iter().flatten() {
                    nets.insert(key(&i.meta.project, &i.spec.network));
                    groups.extend(
                        i.spec
                            .security_groups
                            .iter()
                            .map(|g| key(&i.meta.project, g)),
                    );
                    map_nodes.extend(i.status.node.clone());
                }
            }
            let assignment = match views {
                [Some(a), Some(b)] => assignment_changed(a, b),
                _ => true,
            };
            if assignment {
                for i in views.into_iter().flatten() {
                    assignment_nodes.extend(i.status.node.clone());
                }
            }
            let backend = match views {
                [Some(a), Some(b)] => backend_changed(a, b),
                _ => true,
            };
            if backend {
                for (k, lb) in self.data.loadbalancers.iter() {
                    if views.into_iter().flatten().any(|i| lb_selects(lb, i)) {
                        lbs.insert(k.clone());
                    }
                }
            }
            if let Some(b) = before {
                self.index.account(b, false);
            }
            if let Some(a) = after {
                self.index.account(a, true);
            }
            let mut engine = self.index.engine.lock();
            if let Some(e) = engine.as_mut() {
                let kept = before.is_none_or(|b| e.account(b, false))
                    && after.is_none_or(|a| e.account(a, true));
                if !kept {
                    *engine = None;
                }
            }
        }
        if nodes_changed
            .iter()
            .any(|(name, before)| before.as_ref() != self.data.nodes.get(name))
        {
            self.drop_engine();
        }
        for (name, before) in &nodes_changed {
            if underlay_changed(before.as_ref(), self.data.nodes.get(name)) {
                // Its own map carries its address; its networks' peers carry it too.
                map_nodes.insert(name.clone());
                nets.extend(
                    self.index
                        .net_hosts
                        .iter()
                        .filter(|(_, hosts)| hosts.contains_key(name))
                        .map(|(n, _)| n.clone()),
                );
            }
        }
        for (k, before) in &lbs_changed {
            let after = self.data.loadbalancers.get(k);
            let served = |lb: Option<&LoadBalancer>| -> BTreeSet<String> {
                lb.map(|l| l.status.nodes.iter().cloned().collect())
                    .unwrap_or_default()
            };
            let (was, is) = (served(before.as_ref()), served(after));
            // Nodes that start or stop serving it learn it through their own revision; the
            // others only when what they serve changed.
            assignment_nodes.extend(was.symmetric_difference(&is).cloned());
            let changed = match (before, after) {
                (Some(a), Some(b)) => a.spec != b.spec || a.meta.version != b.meta.version,
                _ => false,
            };
            if changed {
                lbs.insert(k.clone());
            }
        }
        for n in assignment_nodes {
            self.bump_assignments(&n);
        }
        for n in map_nodes {
            self.bump_network_of(&n);
        }
        for n in nets {
            self.bump_net(&n);
        }
        for g in groups {
            self.bump_group(&g);
        }
        for k in lbs {
            self.bump_lb(&k);
        }
    }

    /// Mutable access to an instance (copied first if a snapshot still shares it).
    pub(crate) fn instance_mut(&mut self, id: &str) -> Option<&mut Instance> {
        self.data.instances.get_mut(id).map(Arc::make_mut)
    }

    /// Instances placed on `node`, by id.
    pub fn instances_on<'a>(&'a self, node: &str) -> impl Iterator<Item = &'a Instance> + 'a {
        self.index
            .by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|id| self.data.instances.get(&**id).map(|i| &**i))
    }

    /// Finds an instance by project and name.
    pub fn instance_by_name(&self, project: &str, name: &str) -> Option<&Instance> {
        let id = self
            .index
            .by_name
            .get(&(project.to_string(), name.to_string()))?;
        self.data.instances.get(&**id).map(|i| &**i)
    }

    /// A project's instances in name order, starting after `after` (a name).
    pub fn project_instances<'a>(
        &'a self,
        project: &str,
        after: Option<&str>,
    ) -> impl Iterator<Item = &'a Instance> + 'a {
        use std::ops::Bound;
        let p = project.to_string();
        let start = match after {
            Some(a) => Bound::Excluded((p.clone(), a.to_string())),
            None => Bound::Included((p.clone(), String::new())),
        };
        self.index
            .by_name
            .range((start, Bound::Unbounded))
            .take_while(move |((proj, _), _)| *proj == p)
            .filter_map(|(_, id)| self.data.instances.get(&**id).map(|i| &**i))
    }

    /// How many instances a project has.
    pub fn project_instance_count(&self, project: &str) -> usize {
        self.project_instances(project, None).count()
    }

    /// Instances of a network (`project/name`), by id.
    pub fn network_instances<'a>(&'a self, net: &str) -> impl Iterator<Item = &'a Instance> + 'a {
        self.index
            .by_network
            .get(net)
            .into_iter()
            .flatten()
            .filter_map(|id| self.data.instances.get(&**id).map(|i| &**i))
    }

    /// Instances with an address in a security group (`project/name`), by id.
    pub fn group_instances<'a>(&'a self, group: &str) -> impl Iterator<Item = &'a Instance> + 'a {
        self.index
            .by_group
            .get(group)
            .into_iter()
            .flatten()
            .filter_map(|id| self.data.instances.get(&**id).map(|i| &**i))
    }

    /// Ids of instances waiting for a placement.
    pub fn pending_instances(&self) -> impl Iterator<Item = &str> {
        self.index.pending.iter().map(|id| &**id)
    }

    /// The addresses held in a network (`project/name`).
    pub fn network_ips(&self, net: &str) -> Option<&BTreeSet<u32>> {
        self.index.ips.get(net)
    }

    /// Reservations on a node.
    pub fn node_alloc(&self, node: &str) -> Option<&NodeAlloc> {
        self.index.alloc.get(node)
    }

    /// The indexes rebuilt from scratch equal the maintained ones (tests).
    #[cfg(test)]
    pub(crate) fn index_is_consistent(&self) -> bool {
        let fresh = Index::build(self.data.instances.values().map(|i| &**i));
        fresh.by_name == self.index.by_name
            && fresh.by_node == self.index.by_node
            && fresh.by_network == self.index.by_network
            && fresh.by_group == self.index.by_group
            && fresh.net_hosts == self.index.net_hosts
            && fresh.group_hosts == self.index.group_hosts
            && fresh.pending == self.index.pending
            && fresh.ips == self.index.ips
            && fresh.alloc == self.index.alloc
    }
}
