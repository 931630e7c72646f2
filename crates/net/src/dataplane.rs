//! Executes the datapath plans: reads links, addresses, FDB and neighbour entries over
//! netlink and applies [`plan::Op`]s; reads and writes the nftables tables through `nft`
//! (JSON listing, scripts on stdin). [`converge`] does one full pass for a network map.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoBridge, InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlag, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlag, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::AddressFamily;
use nimbus_api::agent::{InstancePlan, NetworkMap};
use tokio::io::AsyncWriteExt;

use crate::link::{errno_of, EEXIST, ENODEV, ESRCH};
use crate::nft::{self, TableState};
use crate::plan::{self, Actual, Fdb, Kind, LinkState, Neigh, Op};
use crate::{NetError, Netlink};

const ENOENT: i32 = 2;
const EADDRNOTAVAIL: i32 = 99;

fn mac6(v: &[u8]) -> Option<[u8; 6]> {
    v.try_into().ok()
}

fn kind_of(msg: &LinkMessage) -> Kind {
    let mut kind = Kind::Other;
    for a in &msg.attributes {
        let LinkAttribute::LinkInfo(infos) = a else {
            continue;
        };
        let is = |k: &InfoKind| {
            infos
                .iter()
                .any(|i| matches!(i, LinkInfo::Kind(x) if x == k))
        };
        for i in infos {
            match i {
                LinkInfo::Data(InfoData::Bridge(b)) if is(&InfoKind::Bridge) => {
                    let nf = b.iter().any(|x| matches!(x, InfoBridge::NfCallIpTables(1)));
                    kind = Kind::Bridge {
                        nf_call_iptables: nf,
                    };
                }
                LinkInfo::Data(InfoData::Vxlan(v)) if is(&InfoKind::Vxlan) => {
                    let (mut vni, mut local, mut port, mut learning, mut proxy) =
                        (0, None, 0, true, false);
                    for x in v {
                        match x {
                            InfoVxlan::Id(i) => vni = *i,
                            InfoVxlan::Local(b) => {
                                local = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from);
                            }
                            InfoVxlan::Port(p) => port = *p,
                            InfoVxlan::Learning(l) => learning = *l,
                            InfoVxlan::Proxy(p) => proxy = *p,
                            _ => {}
                        }
                    }
                    kind = Kind::Vxlan {
                        vni,
                        local,
                        port,
                        learning,
                        proxy,
                    };
                }
                _ => {}
            }
        }
        if matches!(kind, Kind::Other) && is(&InfoKind::Bridge) {
            kind = Kind::Bridge {
                nf_call_iptables: false,
            };
        }
    }
    kind
}

impl Netlink {
    /// Every link of the namespace.
    pub async fn links(&self) -> Result<Vec<LinkState>, NetError> {
        let mut out = Vec::new();
        let mut s = self.handle.link().get().execute();
        while let Some(msg) = s
            .try_next()
            .await
            .map_err(NetError::netlink("list links"))?
        {
            let mut l = LinkState {
                name: String::new(),
                index: msg.header.index,
                kind: kind_of(&msg),
                master: None,
                mac: Vec::new(),
                up: msg.header.flags.contains(&LinkFlag::Up),
            };
            for a in &msg.attributes {
                match a {
                    LinkAttribute::IfName(n) => l.name.clone_from(n),
                    LinkAttribute::Controller(m) => l.master = Some(*m),
                    LinkAttribute::Address(m) => l.mac.clone_from(m),
                    _ => {}
                }
            }
            out.push(l);
        }
        Ok(out)
    }

    async fn ipv4_addrs(&self, index: u32) -> Result<BTreeSet<(Ipv4Addr, u8)>, NetError> {
        let mut out = BTreeSet::new();
        let mut s = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(m) = s
            .try_next()
            .await
            .map_err(NetError::netlink("list addresses"))?
        {
            for a in &m.attributes {
                if let AddressAttribute::Address(IpAddr::V4(ip)) = a {
                    out.insert((*ip, m.header.prefix_len));
                }
            }
        }
        Ok(out)
    }

    async fn neighbours(&self, family: AddressFamily) -> Result<Vec<NeighbourMessage>, NetError> {
        let mut req = self.handle.neighbours().get();
        req.message_mut().header.family = family;
        req.execute()
            .try_collect()
            .await
            .map_err(NetError::netlink("list neighbours"))
    }

    /// Reads what the L2 planner compares against; `prefix` selects our devices.
    pub async fn datapath(&self, prefix: &str) -> Result<Actual, NetError> {
        let links = self.links().await?;
        let mut a = Actual::default();
        let ours = |l: &LinkState, k| plan::owned(prefix, &l.name, k);
        for l in links.iter().filter(|l| ours(l, 'b')) {
            a.addrs
                .insert(l.name.clone(), self.ipv4_addrs(l.index).await?);
        }
        let vx: std::collections::BTreeMap<u32, &str> = links
            .iter()
            .filter(|l| ours(l, 'v'))
            .map(|l| (l.index, l.name.as_str()))
            .collect();
        if !vx.is_empty() {
            for m in self.neighbours(AddressFamily::Bridge).await? {
                let Some(dev) = vx.get(&m.header.ifindex) else {
                    continue;
                };
                if !m.header.flags.contains(&NeighbourFlag::Own) {
                    continue;
                }
                let (mut mac, mut dst) = (None, None);
                for attr in &m.attributes {
                    match attr {
                        NeighbourAttribute::LinkLocalAddress(l) => mac = mac6(l),
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => {
                            dst = Some(*ip);
                        }
                        // In an AF_BRIDGE answer the parser cannot tell the address family.
                        NeighbourAttribute::Destination(NeighbourAddress::Other(b)) => {
                            dst = <[u8; 4]>::try_from(b.as_slice()).ok().map(Ipv4Addr::from);
                        }
                        _ => {}
                    }
                }
                if let (Some(mac), Some(dst)) = (mac, dst) {
                    a.fdb.insert(Fdb {
                        dev: (*dev).to_string(),
                        mac,
                        dst,
                    });
                }
            }
            for m in self.neighbours(AddressFamily::Inet).await? {
                let Some(dev) = vx.get(&m.header.ifindex) else {
                    continue;
                };
                let (mut mac, mut ip) = (None, None);
                for attr in &m.attributes {
                    match attr {
                        NeighbourAttribute::LinkLocalAddress(l) => mac = mac6(l),
                        NeighbourAttribute::Destination(NeighbourAddress::Inet(i)) => {
                            ip = Some(*i);
                        }
                        _ => {}
                    }
                }
                if let (Some(mac), Some(ip)) = (mac, ip) {
                    a.neigh.insert(Neigh {
                        dev: (*dev).to_string(),
                        ip,
                        mac,
                    });
                }
            }
        }
        a.links = links;
        Ok(a)
    }

    async fn change_link(&self, msg: LinkMessage) -> Result<(), rtnetlink::Error> {
        use futures::StreamExt;
        use netlink_packet_core::{NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_REQUEST};
        let mut req = NetlinkMessage::from(netlink_packet_route::RouteNetlinkMessage::NewLink(msg));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        let mut resp = self.handle.clone().request(req)?;
        while let Some(m) = resp.next().await {
            if let NetlinkPayload::Error(e) = m.payload {
                return Err(rtnetlink::Error::NetlinkError(e));
            }
        }
        Ok(())
    }

    async fn index(&self, name: &str) -> Result<u32, NetError> {
        self.link_index(name)
            .await?
            .ok_or_else(|| NetError::NoSuchLink(name.to_string()))
    }

    /// Applies one planned operation. Tolerates "already exists" / "already gone".
    pub async fn apply(&self, op: &Op) -> Result<(), NetError> {
        let what = format!("{op:?}");
        let tolerate = |r: Result<(), rtnetlink::Error>, ok: &[i32]| match r {
            Ok(()) => Ok(()),
            Err(e) if errno_of(&e).is_some_and(|c| ok.contains(&c)) => Ok(()),
            Err(e) => Err(NetError::netlink(what.clone())(e)),
        };
        match op {
            Op::CreateBridge { name } => tolerate(
                self.handle
                    .link()
                    .add()
                    .bridge(name.clone())
                    .execute()
                    .await,
                &[EEXIST],
            ),
            Op::ConfigureBridge { name, mac } => {
                let index = self.index(name).await?;
                // `ip link set NAME type bridge nf_call_iptables 1`: RTM_NEWLINK on the
                // existing index without NLM_F_EXCL / NLM_F_REPLACE (rtnetlink's add request
                // always sets one of them, and the kernel refuses both for a change).
                let mut m = LinkMessage::default();
                m.header.index = index;
                m.attributes.push(LinkAttribute::LinkInfo(vec![
                    LinkInfo::Kind(InfoKind::Bridge),
                    LinkInfo::Data(InfoData::Bridge(vec![InfoBridge::NfCallIpTables(1)])),
                ]));
                tolerate(self.change_link(m).await, &[])?;
                tolerate(
                    self.handle
                        .link()
                        .set(index)
                        .address(mac.to_vec())
                        .up()
                        .execute()
                        .await,
                    &[],
                )
            }
            Op::AddAddr { link, addr, len } => {
                let index = self.index(link).await?;
                self.add_address(index, IpAddr::V4(*addr), *len).await
            }
            Op::DelAddr { link, addr, len } => {
                let index = self.index(link).await?;
                let mut m = AddressMessage::default();
                m.header.family = AddressFamily::Inet;
                m.header.prefix_len = *len;
                m.header.index = index;
                m.attributes
                    .push(AddressAttribute::Local(IpAddr::V4(*addr)));
                m.attributes
                    .push(AddressAttribute::Address(IpAddr::V4(*addr)));
                tolerate(
                    self.handle.address().del(m).execute().await,
                    &[EADDRNOTAVAIL],
                )
            }
            Op::CreateVxlan { name, spec } => tolerate(
                self.handle
                    .link()
                    .add()
                    .vxlan(name.clone(), spec.vni)
                    .local(spec.local)
                    .port(spec.port)
                    .learning(false)
                    .proxy(true)
                    .execute()
                    .await,
                &[EEXIST],
            ),
            Op::Attach { link, bridge } => self.set_master_and_up(link, bridge).await,
            Op::DeleteLink { name } => self.delete_link(name).await,
            Op::FdbAdd(f) | Op::FdbDel(f) => {
                let index = self.index(&f.dev).await?;
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Bridge;
                m.header.ifindex = index;
                m.header.state = NeighbourState::Permanent;
                m.header.flags = vec![NeighbourFlag::Own];
                m.attributes
                    .push(NeighbourAttribute::LinkLocalAddress(f.mac.to_vec()));
                m.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                        f.dst,
                    )));
                if matches!(op, Op::FdbAdd(_)) {
                    let mut req = self.handle.neighbours().add_bridge(index, &f.mac);
                    *req.message_mut() = m;
                    tolerate(req.replace().execute().await, &[EEXIST])
                } else {
                    tolerate(
                        self.handle.neighbours().del(m).execute().await,
                        &[ENOENT, ENODEV, ESRCH],
                    )
                }
            }
            Op::NeighAdd(n) => {
                let index = self.index(&n.dev).await?;
                tolerate(
                    self.handle
                        .neighbours()
                        .add(index, IpAddr::V4(n.ip))
                        .link_local_address(&n.mac)
                        .state(NeighbourState::Permanent)
                        .replace()
                        .execute()
                        .await,
                    &[EEXIST],
                )
            }
            Op::NeighDel(n) => {
                let index = self.index(&n.dev).await?;
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Inet;
                m.header.ifindex = index;
                m.attributes
                    .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
                        n.ip,
                    )));
                tolerate(
                    self.handle.neighbours().del(m).execute().await,
                    &[ENOENT, ENODEV, ESRCH],
                )
            }
        }
    }
}

/// Turns on IPv4 forwarding in this network namespace (instances' traffic is routed by the
/// host: between subnets, to the outside, to published ports). Sysctls under `net` belong to
/// the namespace of the process that opens them.
fn enable_forwarding() -> Result<(), NetError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    let cur = std::fs::read_to_string(PATH).map_err(NetError::io(format!("reading {PATH}")))?;
    if cur.trim() != "1" {
        std::fs::write(PATH, "1").map_err(NetError::io(format!("writing {PATH}")))?;
        tracing::info!("enabled IPv4 forwarding");
    }
    Ok(())
}

/// Runs `nft` with `args`, feeding `stdin`; returns stdout.
pub async fn nft(args: &[&str], stdin: Option<&str>) -> Result<String, NetError> {
    let mut cmd = tokio::process::Command::new("nft");
    cmd.args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().map_err(NetError::io("running nft"))?;
    if let Some(mut w) = child.stdin.take() {
        if let Some(s) = stdin {
            w.write_all(s.as_bytes())
                .await
                .map_err(NetError::io("writing an nft script"))?;
        }
    }
    let out = child
        .wait_with_output()
        .await
        .map_err(NetError::io("running nft"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(NetError::Nft(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ))
    }
}

/// Reads table `family table` (`None` if absent).
pub async fn read_table(
    spec: &nft::TableSpec,
    table: &str,
) -> Result<Option<TableState>, NetError> {
    match nft(&["-j", "list", "table", spec.family, table], None).await {
        Ok(json) => nft::parse_table(spec, &json)
            .map(Some)
            .map_err(NetError::Nft),
        Err(NetError::Nft(msg)) if msg.contains("No such file") => Ok(None),
        Err(e) => Err(e),
    }
}

/// What one pass changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Converged {
    /// Netlink operations applied.
    pub ops: Vec<Op>,
    /// nftables element changes (a replaced table counts its elements).
    pub nft_changes: usize,
}

/// The default host interface of an instance: `nv<shortid>` for containers, `nt<shortid>` for
/// VMs (an agent with a runtime scope names its veths otherwise and passes its own naming to
/// [`converge`]).
pub fn instance_ifname(i: &InstancePlan) -> String {
    let prefix = match i.instance_type {
        nimbus_api::InstanceType::Container => "nv",
        nimbus_api::InstanceType::Vm => "nt",
    };
    crate::host_ifname(prefix, &i.id)
}

/// One convergence pass of the node's datapath to `map`: netlink objects first (read, plan,
/// apply), then the nftables tables `inet <table>` and `bridge <table>` (read, plan, one
/// atomic script). Applying the same map again changes nothing. `ifname` names an instance's
/// host interface.
pub async fn converge(
    nl: &Netlink,
    map: &NetworkMap,
    table: &str,
    ifname: &(dyn Fn(&InstancePlan) -> String + Sync),
) -> Result<Converged, NetError> {
    if !map.networks.is_empty() {
        enable_forwarding()?;
    }
    let want = plan::want(map);
    let actual = nl.datapath(&map.prefix).await?;
    let ops = plan::plan(&map.prefix, &want, &actual);
    for op in &ops {
        nl.apply(op).await?;
    }
    let desired = nft::desired(map, ifname);
    let mut script = String::new();
    let mut changes = 0;
    for (spec, want) in [(&nft::INET, &desired.inet), (&nft::BRIDGE, &desired.bridge)] {
        let have = read_table(spec, table).await?;
        let want = (!desired.empty).then_some(want);
        let (s, n) = nft::plan_table(spec, table, have.as_ref(), want);
        script.push_str(&s);
        changes += n;
    }
    if !script.is_empty() {
        nft(&["-f", "-"], Some(&script)).await?;
    }
    Ok(Converged {
        ops,
        nft_changes: changes,
    })
}
