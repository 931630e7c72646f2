//! On the wire, TLS 1.3 only. Each test runs its components in the network namespaces of the
//! testkit harness while `tcpdump` captures every TCP packet on the switch between them (and
//! the test process, whose CLI and client calls cross it too); then every TCP flow to a
//! component port must open with a TLS ClientHello offering TLS 1.3 answered by a ServerHello
//! choosing it, and no payload on the wire may hold a plain HTTP request or status line.
//!
//! - client→server and server↔agent: a `nimbus server` with its internal CA and two agents
//!   that joined it with join tokens; instances are launched, exec'd and listed.
//! - server↔server: three servers forming a TLS cluster with `--bootstrap-expect 3` (the CA
//!   settled between them, certificates, master key and CA handed over), then Raft, a write
//!   forwarded by a follower, a follower's read barrier, and an image's blobs replicated from
//!   the follower it was uploaded to.

use std::net::SocketAddrV4;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nimbus_api::{CreateInstanceRequest, InstanceState, NodeState};
use nimbus_testkit::netns::{self, Net, AGENT_PORT, PORT};
use nimbus_testkit::pcap::{self, Capture};
use nimbus_testkit::{eventually, have, require};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

/// Plain HTTP on the wire (request lines and a status line).
const PLAIN: [&[u8]; 3] = [b"GET /", b"POST /", b"HTTP/1.1 "];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_component_flow_opens_with_a_tls13_handshake() {
    if !(require(
        "root, ip, tc, nft, nsenter (netns harness)",
        netns::available(),
    ) && require("tcpdump", have("tcpdump"))
        && require("runc", have("runc"))
        && require("/bin/busybox", Path::new("/bin/busybox").exists()))
    {
        return;
    }
    let started = Instant::now();
    let mut net = Net::new(bin(), 3).expect("netns hosts");
    let capture =
        Capture::start(net.switch_ns(), "br0", &net.scratch().join("wire.pcap")).expect("tcpdump");

    net.start_tls_server(0, &[]).expect("server");
    let ca = net.hosts[0].ca_file();
    let ready = eventually(Duration::from_secs(30), || async {
        if !ca.exists() {
            return None;
        }
        net.client(0).health().await.ok()
    })
    .await;
    assert!(ready.is_some(), "TLS server not up\n{}", net.logs_tail(20));
    let c = net.client(0);
    for (i, name) in [(1, "h1"), (2, "h2")] {
        let token = c.create_join_token(600).await.expect("join token").token;
        net.join_agent(i, name, 0, &token, &[]).expect("agent");
    }
    let ready = eventually(Duration::from_secs(60), || async {
        let nodes = c.list_nodes().await.ok()?;
        let images = c.list_images().await.ok()?;
        (nodes.iter().filter(|n| n.state == NodeState::Ready).count() == 2
            && images.iter().any(|i| i.meta.name == "busybox"))
        .then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "agents not ready\n{}\n{}\n{}",
        net.logs_tail(20),
        net.agent_log(1),
        net.agent_log(2)
    );

    // The CLI (its own TLS setup) launches one instance, the client library the other; one
    // per node.
    let cli = |args: &[&str]| {
        let out = Command::new(bin())
            .env("NIMBUS_URL", net.hosts[0].url())
            .env("NIMBUS_TOKEN", &net.admin_token)
            .env("NIMBUS_CA", &ca)
            .env_remove("NIMBUS_PROJECT")
            .args(args)
            .output()
            .expect("nimbus CLI");
        assert!(
            out.status.success(),
            "nimbus {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    cli(&[
        "launch",
        "busybox",
        "w1",
        "--memory",
        "32M",
        "--spread-group",
        "wire",
        "--anti-affinity",
        "--",
        "sleep",
        "3600",
    ]);
    c.create_instance(
        &CreateInstanceRequest {
            name: "w2".into(),
            image: "busybox".into(),
            memory: Some(serde_json::json!("32M")),
            command: vec!["sleep".into(), "3600".into()],
            spread_group: Some("wire".into()),
            anti_affinity: true,
            ..CreateInstanceRequest::default()
        },
        None,
    )
    .await
    .expect("create w2");
    let running = eventually(Duration::from_secs(60), || async {
        let all = c.list_instances().await.ok()?;
        let nodes: std::collections::BTreeSet<_> = all
            .iter()
            .filter(|i| i.status.state == InstanceState::Running)
            .filter_map(|i| i.status.node.clone())
            .collect();
        (nodes.len() == 2).then_some(())
    })
    .await;
    assert!(
        running.is_some(),
        "w1 and w2 not running on both nodes\n{}",
        net.logs_tail(20)
    );
    assert!(cli(&["exec", "w1", "--", "echo", "one"]).contains("one"));
    let r = c
        .exec("w2", vec!["echo".into(), "two".into()])
        .await
        .expect("exec w2");
    assert!(r.stdout.contains("two"), "{r:?}");
    assert!(cli(&["list"]).contains("w1"));
    for name in ["w1", "w2"] {
        c.delete_instance(name).await.expect("delete");
    }
    let gone = eventually(Duration::from_secs(60), || async {
        c.list_instances().await.ok()?.is_empty().then_some(())
    })
    .await;
    assert!(gone.is_some(), "instances not deleted");

    // A connection to a closed port of the server's host marks the end of the capture.
    let marker = format!("{}:9", net.hosts[0].addr).parse().unwrap();
    let packets = capture.stop_after(marker).expect("capture");
    let flows = pcap::flows(&packets);
    let server = net.hosts[0].addr.clone();
    let mut checked = (0, 0); // (to the server API, to an agent API)
    let failures = tls_only(&flows, &packets, |to| match to.port() {
        PORT if to.ip().to_string() == server => {
            checked.0 += 1;
            true
        }
        AGENT_PORT => {
            checked.1 += 1;
            true
        }
        _ => false,
    });
    eprintln!(
        "{} packets, {} TCP flows; {} to the server API and {} to agent APIs opened with TLS 1.3; {:.0} s",
        packets.len(),
        flows.len(),
        checked.0,
        checked.1,
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The agents called the server and the server called both agents (exec).
    assert!(checked.0 >= 2, "flows to the server: {}", checked.0);
    let agents_called: std::collections::BTreeSet<_> = flows
        .iter()
        .filter_map(|f| {
            f.server
                .filter(|a| a.port() == AGENT_PORT && !f.client_bytes.is_empty())
        })
        .map(|a| *a.ip())
        .collect();
    assert_eq!(
        agents_called.len(),
        2,
        "both agents' APIs were called: {agents_called:?}"
    );
}

/// Checks that every flow to a component port (`component`, called once per flow that carried
/// bytes) opens with a TLS 1.3 ClientHello/ServerHello, that every flow's SYN is in the
/// capture, and that no payload holds plain HTTP; returns what failed.
fn tls_only(
    flows: &[pcap::Flow],
    packets: &[pcap::Packet],
    mut component: impl FnMut(SocketAddrV4) -> bool,
) -> Vec<String> {
    let mut failures = Vec::new();
    for f in flows {
        let Some(to) = f.server else {
            failures.push(format!("a flow without its SYN in the capture: {f:?}"));
            continue;
        };
        if f.client_bytes.is_empty() {
            continue; // opened and closed without a byte (nothing to read)
        }
        if !component(to) {
            continue;
        }
        let from = f.client.expect("with its server");
        if let Some(why) = pcap::not_a_tls13_client_hello(&f.client_bytes) {
            failures.push(format!("{from} -> {to}: {why}"));
        } else if let Some(why) = pcap::not_a_tls13_server_hello(&f.server_bytes) {
            failures.push(format!("{from} -> {to}: the answer: {why}"));
        }
    }
    for p in packets {
        for plain in PLAIN {
            if p.payload.windows(plain.len()).any(|w| w == plain) {
                failures.push(format!(
                    "plain HTTP {:?} on the wire: {} -> {}",
                    String::from_utf8_lossy(plain),
                    p.src,
                    p.dst
                ));
            }
        }
    }
    failures
}

/// A one-layer image (`/hello.txt`) as an OCI layout tarball.
fn tiny_image(dir: &Path) -> std::path::PathBuf {
    use nimbus_image::testutil::{self, FixtureConfig, LayerEntry};
    let layer = testutil::layer_tar(&[LayerEntry::file(
        "hello.txt",
        b"replicated between servers over mTLS\n",
    )])
    .expect("layer");
    let cfg = FixtureConfig {
        name: Some("tiny:1".into()),
        cmd: vec!["/hello.txt".into()],
        ..FixtureConfig::default()
    };
    let path = dir.join("tiny.tar");
    testutil::write_oci_layout_tarball_layers(&[layer], &path, &cfg).expect("tarball");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_to_server_flow_opens_with_a_tls13_handshake() {
    if !(require(
        "root, ip, tc, nft, nsenter (netns harness)",
        netns::available(),
    ) && require("tcpdump", have("tcpdump")))
    {
        return;
    }
    let started = Instant::now();
    let mut net = Net::new(bin(), 3).expect("netns hosts").with_tls();
    let capture =
        Capture::start(net.switch_ns(), "br0", &net.scratch().join("wire.pcap")).expect("tcpdump");

    // No server holds a CA at start: they settle it among themselves over TLS.
    net.start_servers(&[]).expect("servers");
    let settled = eventually(Duration::from_secs(30), || async {
        net.hosts.iter().all(|h| h.ca_file().exists()).then_some(())
    })
    .await;
    assert!(settled.is_some(), "no cluster CA\n{}", net.logs_tail(20));
    let leader = net
        .wait_cluster(&[0, 1, 2], 3, Duration::from_secs(30))
        .await
        .expect("TLS cluster");
    let follower = (0..3).find(|&i| i != leader).unwrap();
    let c = net.client(follower);
    // A write forwarded to the leader and a read barrier (listing nodes) through a follower.
    c.create_project("wire").await.expect("forwarded write");
    c.list_nodes().await.expect("read through a follower");
    // Blob replication: the image lands on the follower; the other servers fetch its layer.
    let tmp = tempfile::tempdir().expect("tmp");
    let img = c
        .import_image(&tiny_image(tmp.path()), Some("tiny"))
        .await
        .expect("import through a follower");
    let replicated = eventually(Duration::from_secs(20), || async {
        net.hosts
            .iter()
            .all(|h| {
                let store = nimbus_image::ImageStore::open(&h.data_dir.join("images"));
                store.is_ok_and(|s| img.layers.iter().all(|l| s.has_blob(l)))
            })
            .then_some(())
    })
    .await;
    assert!(
        replicated.is_some(),
        "the layer was not replicated to every server\n{}",
        net.logs_tail(20)
    );

    let marker = format!("{}:9", net.hosts[0].addr).parse().unwrap();
    let packets = capture.stop_after(marker).expect("capture");
    let flows = pcap::flows(&packets);
    let hosts: Vec<String> = net.hosts.iter().map(|h| h.addr.clone()).collect();
    let is_host = |a: &SocketAddrV4| hosts.contains(&a.ip().to_string());
    let mut to_servers = 0;
    let failures = tls_only(&flows, &packets, |to| {
        let server = to.port() == PORT && is_host(&to);
        to_servers += usize::from(server);
        server
    });
    // Server-to-server flows (both ends hosts' addresses), by unordered pair of hosts.
    let pairs: std::collections::BTreeSet<(String, String)> = flows
        .iter()
        .filter(|f| !f.client_bytes.is_empty())
        .filter_map(|f| Some((f.client?, f.server?)))
        .filter(|(from, to)| to.port() == PORT && is_host(from) && is_host(to))
        .map(|(from, to)| {
            let (a, b) = (from.ip().to_string(), to.ip().to_string());
            if a < b {
                (a, b)
            } else {
                (b, a)
            }
        })
        .collect();
    let s2s = flows
        .iter()
        .filter(|f| {
            !f.client_bytes.is_empty()
                && f.client.is_some_and(|a| is_host(&a))
                && f.server.is_some_and(|a| a.port() == PORT && is_host(&a))
        })
        .count();
    eprintln!(
        "{} packets, {} TCP flows; {to_servers} to server APIs ({s2s} between servers, {} pairs) opened with TLS 1.3; {:.0} s",
        packets.len(),
        flows.len(),
        pairs.len(),
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(pairs.len(), 3, "every pair of servers talked: {pairs:?}");
}
