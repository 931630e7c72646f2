//! Root integration tests: bridge + named netns + veth, traffic from the host into the netns.
//!
//! These need root (CAP_NET_ADMIN, CAP_SYS_ADMIN). Without root they fail, unless
//! `NIMBUS_SKIP_ROOT_TESTS=1` is set.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::time::Duration;

use nimbus_api::agent::NetworkAttachment;
use nimbus_net::{
    create_container_netns, delete_container_netns, host_ifname, in_netns, netns_path, Netlink,
};

fn skip() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    assert!(
        std::env::var("NIMBUS_SKIP_ROOT_TESTS").as_deref() == Ok("1"),
        "network tests need root (set NIMBUS_SKIP_ROOT_TESTS=1 to skip)"
    );
    true
}

fn suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

/// A subnet 10.214.X.0/24 unlikely to collide across parallel tests.
fn subnet() -> u8 {
    (uuid::Uuid::new_v4().as_bytes()[0] % 250) + 1
}

struct Cleanup {
    bridge: String,
    ids: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let bridge = self.bridge.clone();
        let ids = self.ids.clone();
        // Own runtime on a fresh thread: Drop may run inside the test runtime.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let nl = Netlink::connect().await.unwrap();
                for id in &ids {
                    let _ = delete_container_netns(&nl, id).await;
                }
                let _ = nl.delete_link(&bridge).await;
            });
        })
        .join()
        .unwrap();
    }
}

#[tokio::test]
async fn bridge_is_idempotent_and_counts() {
    if skip() {
        return;
    }
    let bridge = format!("nbt{}", suffix());
    let _cleanup = Cleanup {
        bridge: bridge.clone(),
        ids: vec![],
    };
    let nl = Netlink::connect().await.unwrap();
    assert_eq!(nl.link_index(&bridge).await.unwrap(), None);
    assert_eq!(nl.counters(&bridge).await.unwrap(), None);
    let gw = Ipv4Addr::new(10, 214, subnet(), 1);
    let a = nl.ensure_bridge(&bridge, gw, 24).await.unwrap();
    let b = nl.ensure_bridge(&bridge, gw, 24).await.unwrap();
    assert_eq!(a, b);
    assert_eq!(nl.link_index(&bridge).await.unwrap(), Some(a));
    assert!(nl.counters(&bridge).await.unwrap().is_some());
    nl.delete_link(&bridge).await.unwrap();
    nl.delete_link(&bridge).await.unwrap();
    assert_eq!(nl.link_index(&bridge).await.unwrap(), None);
}

#[tokio::test]
async fn container_netns_reachable_from_host() {
    if skip() {
        return;
    }
    let bridge = format!("nbt{}", suffix());
    let id = uuid::Uuid::new_v4().to_string();
    let _cleanup = Cleanup {
        bridge: bridge.clone(),
        ids: vec![id.clone()],
    };
    let net = subnet();
    let att = NetworkAttachment {
        bridge: bridge.clone(),
        ip: format!("10.214.{net}.10"),
        prefix_len: 24,
        gateway: format!("10.214.{net}.1"),
        mac: "02:00:0a:d6:00:0a".into(),
        mtu: 0,
    };
    let nl = Netlink::connect().await.unwrap();
    let path = create_container_netns(&nl, &id, &att).await.unwrap();
    assert_eq!(path, netns_path(&id));
    // Idempotent.
    create_container_netns(&nl, &id, &att).await.unwrap();
    let host = host_ifname("nv", &id);
    assert!(nl.link_index(&host).await.unwrap().is_some());

    // A listener inside the namespace, on a dedicated thread that setns'es into it.
    let ip: Ipv4Addr = att.ip.parse().unwrap();
    let ns_path = path.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        let ns = std::fs::File::open(&ns_path).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let listener = TcpListener::bind(SocketAddrV4::new(ip, 7777)).unwrap();
        ready_tx.send(()).unwrap();
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        s.write_all(b"pong").unwrap();
        buf
    });
    ready_rx.recv().unwrap();
    let mut s =
        TcpStream::connect_timeout(&SocketAddrV4::new(ip, 7777).into(), Duration::from_secs(5))
            .expect("connect from host to the netns address");
    s.write_all(b"ping").unwrap();
    let mut answer = [0u8; 4];
    s.read_exact(&mut answer).unwrap();
    assert_eq!(&answer, b"pong");
    assert_eq!(&server.join().unwrap(), b"ping");

    // Inside: eth0 with the MAC, counters moved.
    let (mac_ok, counted) = in_netns(&path, |nl| async move {
        let c = nl.counters("eth0").await?.unwrap();
        Ok((nl.link_index("eth0").await?.is_some(), c.rx_packets > 0))
    })
    .await
    .unwrap();
    assert!(mac_ok && counted);
    assert!(nl.counters(&host).await.unwrap().unwrap().tx_packets > 0);

    delete_container_netns(&nl, &id).await.unwrap();
    delete_container_netns(&nl, &id).await.unwrap();
    assert!(!path.exists());
    assert!(nl.link_index(&host).await.unwrap().is_none());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(path.to_str().unwrap()));
}
