//! On the wire, TLS 1.3 only: a `nimbus server` with its internal CA and two agents that
//! joined it with join tokens, each in its own network namespace of the testkit harness, while
//! `tcpdump` captures every TCP packet on the switch between them (and the test process, whose
//! CLI and client calls cross it too). Instances are launched, exec'd and listed; then every
//! TCP flow to a component port (the server API, the agent API) must open with a TLS
//! ClientHello offering TLS 1.3 answered by a ServerHello choosing it, and no payload on the
//! wire may hold a plain HTTP request or status line.
//!
//! One server only: server-to-server traffic is not TLS yet (multi-server clusters run
//! `--insecure`), so this covers client→server and server↔agent flows.

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
    let mut failures = Vec::new();
    for f in &flows {
        let Some(to) = f.server else {
            failures.push(format!("a flow without its SYN in the capture: {f:?}"));
            continue;
        };
        let component = match to.port() {
            PORT if to.ip().to_string() == server => &mut checked.0,
            AGENT_PORT => &mut checked.1,
            _ => continue,
        };
        if f.client_bytes.is_empty() {
            continue; // opened and closed without a byte (nothing to read)
        }
        *component += 1;
        let from = f.client.expect("with its server");
        if let Some(why) = pcap::not_a_tls13_client_hello(&f.client_bytes) {
            failures.push(format!("{from} -> {to}: {why}"));
        } else if let Some(why) = pcap::not_a_tls13_server_hello(&f.server_bytes) {
            failures.push(format!("{from} -> {to}: the answer: {why}"));
        }
    }
    for p in &packets {
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
