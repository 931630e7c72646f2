//! Named container network namespaces, created without `ip netns`.
//!
//! A namespace is created by a dedicated OS thread that `unshare(CLONE_NEWNET)`s itself and
//! bind-mounts its `/proc/thread-self/ns/net` onto `/run/netns/nimbus-<shortid>`; work inside a
//! namespace runs on a dedicated thread that `setns`es into it and opens its own netlink socket
//! on a current-thread runtime. The tokio runtime's threads never change namespace.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use nimbus_api::agent::NetworkAttachment;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};
use tracing::{debug, info};

use crate::{host_ifname, parse_ipv4, parse_mac, short_id, NetError, Netlink};

/// Where named network namespaces live (as with iproute2).
pub const NETNS_DIR: &str = "/run/netns";

/// Name of the interface inside a container's namespace.
const CONTAINER_IFNAME: &str = "eth0";

/// `statfs` magic of nsfs: a bind-mounted namespace file.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// Path of the named network namespace of a container: `/run/netns/nimbus-<shortid>`.
pub fn netns_path(instance_id: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(format!("nimbus-{}", short_id(instance_id)))
}

/// Whether `path` is a mounted namespace file.
fn is_netns_mount(path: &Path) -> bool {
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC)
}

/// Runs a blocking closure on a fresh OS thread (which may change its own namespaces) and
/// awaits its result without blocking the runtime.
async fn on_dedicated_thread<T, F>(name: &str, f: F) -> Result<T, NetError>
where
    F: FnOnce() -> Result<T, NetError> + Send + 'static,
    T: Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(NetError::io("spawning a namespace thread"))?;
    rx.await.map_err(|_| NetError::Io {
        context: "namespace thread".into(),
        source: std::io::Error::other("namespace thread panicked"),
    })?
}

/// Creates the named network namespace at `path` unless it is already mounted there; returns
/// whether it was created.
async fn ensure_named_netns(path: PathBuf) -> Result<bool, NetError> {
    if is_netns_mount(&path) {
        return Ok(false);
    }
    on_dedicated_thread("nimbus-netns-new", move || {
        std::fs::create_dir_all(NETNS_DIR)
            .map_err(NetError::io(format!("creating {NETNS_DIR}")))?;
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(NetError::io(format!("creating {}", path.display())))?;
        // Only this thread moves into the new namespace; it exits right after.
        unshare(CloneFlags::CLONE_NEWNET).map_err(NetError::sys("unshare(CLONE_NEWNET)"))?;
        let own = format!("/proc/self/task/{}/ns/net", nix::unistd::gettid());
        mount(
            Some(own.as_str()),
            &path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(NetError::sys(format!(
            "bind-mounting {own} on {}",
            path.display()
        )))?;
        debug!(netns = %path.display(), "created network namespace");
        Ok(true)
    })
    .await
}

/// Creates (idempotently) the named network namespace of a container, unwired; returns its
/// path. [`create_container_netns`] wires it (and creates it if needed); a runtime can join the
/// namespace while that runs.
pub async fn ensure_container_netns(instance_id: &str) -> Result<PathBuf, NetError> {
    let path = netns_path(instance_id);
    ensure_named_netns(path.clone()).await?;
    Ok(path)
}

/// Runs `f` with a netlink connection opened inside the network namespace at `path`.
pub async fn in_netns<T, F, Fut>(path: &Path, f: F) -> Result<T, NetError>
where
    F: FnOnce(Netlink) -> Fut + Send + 'static,
    Fut: Future<Output = Result<T, NetError>>,
    T: Send + 'static,
{
    let path = path.to_path_buf();
    on_dedicated_thread("nimbus-netns-op", move || {
        let ns = File::open(&path).map_err(NetError::io(format!("opening {}", path.display())))?;
        setns(&ns, CloneFlags::CLONE_NEWNET)
            .map_err(NetError::sys(format!("setns into {}", path.display())))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(NetError::io("building a namespace runtime"))?;
        rt.block_on(async move {
            let (conn, handle, _) =
                rtnetlink::new_connection().map_err(NetError::io("opening a netlink socket"))?;
            tokio::spawn(conn);
            f(Netlink::from_handle(handle)).await
        })
    })
    .await
}

/// Creates (idempotently) the network namespace of a container and wires it to its bridge:
/// ensures the bridge `att.bridge` with `att.gateway/att.prefix_len`, a veth pair whose host end
/// (`host_ifname("nv", id)`) is on the bridge and whose other end is `eth0` inside the
/// namespace with `att.mac` and `att.ip/att.prefix_len`, `lo` up and a default route via
/// `att.gateway`; the host's neighbour entry for `att.ip` on the bridge names `att.mac` (see
/// [`Netlink::point_neighbour`]). Returns the namespace path ([`netns_path`]).
pub async fn create_container_netns(
    nl: &Netlink,
    instance_id: &str,
    att: &NetworkAttachment,
) -> Result<PathBuf, NetError> {
    let gateway = parse_ipv4("gateway", &att.gateway)?;
    let ip = parse_ipv4("ip", &att.ip)?;
    let mac = parse_mac(&att.mac)?;
    let prefix_len = att.prefix_len;
    let bridge = nl.ensure_bridge(&att.bridge, gateway, prefix_len).await?;

    let path = netns_path(instance_id);
    let created = ensure_named_netns(path.clone()).await?;

    let host = host_ifname("nv", instance_id);
    let has_eth0 = !created
        && in_netns(&path, |nl| async move {
            Ok(nl.link_index(CONTAINER_IFNAME).await?.is_some())
        })
        .await?;
    if !has_eth0 || nl.link_index(&host).await?.is_none() {
        // Start over: a half-built pair from an interrupted attempt is removed first (an
        // older agent created the peer as `np<id>` here and moved it).
        if !created {
            nl.delete_link(&host).await?;
            nl.delete_link(&host_ifname("np", instance_id)).await?;
        }
        let ns = File::open(&path).map_err(NetError::io(format!("opening {}", path.display())))?;
        nl.add_veth_into_netns(&host, bridge, CONTAINER_IFNAME, mac, ns.as_raw_fd())
            .await?;
        debug!(host, netns = %path.display(), "created veth pair");
    } else {
        nl.set_master_and_up(&host, &att.bridge).await?;
    }
    let mtu = att.mtu;
    if mtu > 0 {
        nl.set_mtu(&host, mtu).await?;
    }

    in_netns(&path, move |nl| async move {
        let index = nl
            .link_index(CONTAINER_IFNAME)
            .await?
            .ok_or_else(|| NetError::NoSuchLink(CONTAINER_IFNAME.to_string()))?;
        nl.set_up_index(index, CONTAINER_IFNAME).await?;
        if mtu > 0 {
            nl.set_mtu(CONTAINER_IFNAME, mtu).await?;
        }
        nl.add_address(index, std::net::IpAddr::V4(ip), prefix_len)
            .await?;
        nl.set_up("lo").await?;
        nl.add_default_route(gateway).await
    })
    .await?;
    nl.point_neighbour(&att.bridge, ip, mac).await?;
    info!(instance = instance_id, ip = %ip, bridge = %att.bridge, "container network ready");
    Ok(path)
}

/// Removes a container's veth pair and its named network namespace (unmount + remove the
/// file). No-op for whatever is already absent.
pub async fn delete_container_netns(nl: &Netlink, instance_id: &str) -> Result<(), NetError> {
    nl.delete_link(&host_ifname("nv", instance_id)).await?;
    nl.delete_link(&host_ifname("np", instance_id)).await?;
    let path = netns_path(instance_id);
    if is_netns_mount(&path) {
        match umount2(&path, MntFlags::MNT_DETACH) {
            Ok(()) | Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(e) => {
                return Err(NetError::Sys {
                    context: format!("unmounting {}", path.display()),
                    source: e,
                })
            }
        }
    }
    match std::fs::remove_file(&path) {
        Ok(()) => {
            debug!(netns = %path.display(), "removed network namespace");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(NetError::Io {
            context: format!("removing {}", path.display()),
            source: e,
        }),
    }
}
