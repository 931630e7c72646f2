//! Tenant networks across three hosts, each a network namespace on a shared underlay
//! (`testkit::netns`) running `nimbus agent` (host 0 also runs the server), with real
//! containers, netlink and nftables: one cluster for the whole file, checked phase by phase.
//!
//! Same-project instances on different hosts talk over VXLAN; two projects cannot reach each
//! other (both directions, TCP and ICMP); a security group blocks a port until a rule allows
//! it; egress is masqueraded to the underlay; a published port answers from the underlay; the
//! bad-input cases of the API and CLI are refused with their field; killing and restarting an
//! agent keeps connectivity and repairs drift; deleting everything leaves no interfaces, FDB
//! entries or nftables objects.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use nimbus_api::{
    AddRuleRequest, CreateInstanceRequest, CreateNetworkRequest, ErrorCode, InstanceState,
    SubnetRequest,
};
use nimbus_client::Client;
use nimbus_testkit::netns::{self, Net};
use nimbus_testkit::{eventually, have, require};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

/// Host 0 runs the server; every host runs an agent labelled `host=h<i>`.
async fn cluster() -> Option<Net> {
    if !(require(
        "root, ip, tc, nft, nsenter (netns harness)",
        netns::available(),
    ) && require("runc", have("runc"))
        && require("/bin/busybox", Path::new("/bin/busybox").exists()))
    {
        return None;
    }
    let mut net = Net::new(bin(), 3).expect("netns hosts");
    net.start_servers_with(0, &[]).expect("server");
    for i in 0..3 {
        let label = format!("host=h{i}");
        net.start_agent(i, &format!("h{i}"), &["--label", &label])
            .expect("agent");
    }
    let c = net.client(0);
    let ready = eventually(Duration::from_secs(60), || async {
        let nodes = c.list_nodes().await.ok()?;
        let images = c.list_images().await.ok()?;
        (nodes.len() == 3
            && nodes.iter().all(|n| !n.underlay_ip.is_empty())
            && images.iter().any(|i| i.meta.name == "busybox"))
        .then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "3 agents never registered\n{}",
        net.logs_tail(20)
    );
    Some(net)
}

async fn sh(c: &Client, name: &str, cmd: &str) -> nimbus_api::ExecResponse {
    c.exec(name, vec!["sh".into(), "-c".into(), cmd.into()])
        .await
        .unwrap_or_else(|e| panic!("exec in {name}: {e}"))
}

/// `GET /` from inside `from` to `ip:port` with busybox nc (2 s timeout); the answer.
/// (busybox-static's wget crashes in its resolver, nc does not.)
async fn http(c: &Client, from: &str, ip: &str, port: u16) -> String {
    sh(
        c,
        from,
        &format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {ip} {port}"),
    )
    .await
    .stdout
}

/// Whether `from` gets `GET http://ip:port/` answered.
async fn http_ok(c: &Client, from: &str, ip: &str, port: u16) -> bool {
    http(c, from, ip, port).await.contains("200 OK")
}

async fn ping_ok(c: &Client, from: &str, ip: &str) -> bool {
    sh(c, from, &format!("ping -c 1 -W 2 {ip}")).await.exit_code == 0
}

/// Launches `name` on host `h` serving its own name over HTTP on port 80 (and 8080).
async fn launch(
    net: &Net,
    c: &Client,
    name: &str,
    h: usize,
    f: impl FnOnce(&mut CreateInstanceRequest),
) -> nimbus_api::Instance {
    let mut req = CreateInstanceRequest {
        name: name.into(),
        image: "busybox".into(),
        memory: Some(serde_json::json!("32M")),
        cpus: Some(0.2),
        constraints: vec![format!("host=h{h}")],
        command: vec![
            "sh".into(),
            "-c".into(),
            format!("mkdir -p /www && echo {name} > /www/index.html && httpd -p 8080 -h /www && exec httpd -f -p 80 -h /www"),
        ],
        ..Default::default()
    };
    f(&mut req);
    c.create_instance(&req, None)
        .await
        .unwrap_or_else(|e| panic!("launch {name}: {e}"));
    let i = eventually(Duration::from_secs(60), || async {
        c.get_instance(name)
            .await
            .ok()
            .filter(|i| i.status.state == InstanceState::Running)
    })
    .await;
    i.unwrap_or_else(|| panic!("{name} never ran\n{}", agent_logs(net)))
}

fn agent_logs(net: &Net) -> String {
    (0..3)
        .map(|i| {
            let log = net.agent_log(i);
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            format!(
                "--- agent h{i} ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The datapath of every host, for failure messages.
fn diag(net: &Net) -> String {
    if std::env::var_os("NET_KEEP").is_some() {
        eprintln!(
            "NET_KEEP: keeping the hosts for 10 minutes (slot {})",
            net.slot()
        );
        std::thread::sleep(Duration::from_secs(600));
    }
    let mut out = agent_logs(net);
    for h in 0..3 {
        let _ = write!(
            out,
            "\n--- datapath h{h} ---\n{}{}{}{}",
            run(net, h, "ip", &["-d", "-br", "link"]),
            run(net, h, "bridge", &["fdb", "show"]),
            run(net, h, "ip", &["neigh", "show"]),
            run(net, h, "nft", &["list", "ruleset"]),
        );
    }
    out
}

/// Waits (5 s) until `from` reaches `ip:port`: a new instance's peers learn of it within
/// their next network map.
async fn reaches(c: &Client, from: &str, ip: &str, port: u16) -> bool {
    eventually(Duration::from_secs(5), || async {
        http_ok(c, from, ip, port).await.then_some(())
    })
    .await
    .is_some()
}

fn ip(i: &nimbus_api::Instance) -> String {
    i.status.ip.clone().expect("instance has an address")
}

fn run(net: &Net, h: usize, program: &str, args: &[&str]) -> String {
    let out = net.run_in(h, program, args).expect("run in host");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The CLI against host 0's server, in `project`: (success, stdout, stderr).
fn cli(net: &Net, project: &str, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(bin())
        .env("NIMBUS_URL", net.hosts[0].url())
        .env("NIMBUS_TOKEN", &net.admin_token)
        .args(["--project", project])
        .args(args)
        .output()
        .expect("cli");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn bad_input(net: &Net, c: &Client) {
    // Through the API: each refused with its field, and nothing half-applied.
    let before = c.list_networks().await.unwrap();
    let net_req = |name: &str, cidr: &str, subnets: &[(&str, &str)]| CreateNetworkRequest {
        name: name.into(),
        cidr: Some(cidr.into()),
        subnets: subnets
            .iter()
            .map(|(n, c)| SubnetRequest {
                name: (*n).into(),
                cidr: (*c).into(),
            })
            .collect(),
    };
    let cases = [
        (
            net_req("tiny", "10.90.0.0/30", &[]),
            ErrorCode::InvalidArgument,
            "cidr",
        ),
        (
            net_req("out", "10.90.0.0/24", &[("s", "10.91.0.0/26")]),
            ErrorCode::InvalidArgument,
            "subnets[0].cidr",
        ),
        (
            net_req("over2", "10.88.5.0/24", &[]),
            ErrorCode::Conflict,
            "cidr",
        ),
    ];
    for (req, code, field) in cases {
        let e = c.create_network(&req).await.expect_err("must be refused");
        let e = e.api().expect("API error").clone();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (code, Some(field)),
            "{req:?}: {e:?}"
        );
    }
    let after = c.list_networks().await.unwrap();
    assert_eq!(
        before, after,
        "a refused network create changed the networks"
    );
    let g = c.get_security_group("web").await.unwrap();
    for (req, field) in [
        (("tcp", Some("90-80"), Some("0.0.0.0/0"), None), "ports"),
        (("gre", None, Some("0.0.0.0/0"), None), "protocol"),
        (("tcp", Some("80"), None, Some("ghost")), "group"),
    ] {
        let (protocol, ports, cidr, group) = req;
        let e = c
            .add_rule(
                "web",
                &AddRuleRequest {
                    direction: None,
                    protocol: protocol.into(),
                    ports: ports.map(String::from),
                    cidr: cidr.map(String::from),
                    group: group.map(String::from),
                    description: String::new(),
                },
            )
            .await
            .expect_err("must be refused");
        let e = e.api().expect("API error").clone();
        assert_eq!(
            (e.code, e.field.as_deref()),
            (ErrorCode::InvalidArgument, Some(field)),
            "{e:?}"
        );
    }
    assert_eq!(
        c.get_security_group("web").await.unwrap(),
        g,
        "a refused rule changed the group"
    );
    // Through the CLI: one readable line and a non-zero exit.
    let (ok, _, err) = cli(
        net,
        "alpha",
        &["network", "create", "tiny", "--cidr", "10.90.0.0/30"],
    );
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("too small"), "{err}");
    let (ok, _, err) = cli(
        net,
        "alpha",
        &[
            "sg",
            "rule",
            "add",
            "web",
            "--proto",
            "tcp",
            "--ports",
            "99999",
            "--cidr",
            "0.0.0.0/0",
        ],
    );
    assert!(!ok && err.contains("not a port"), "{err}");
    let (ok, _, err) = cli(net, "alpha", &["network", "delete", "default"]);
    assert!(!ok && err.contains("still has"), "{err}");
    let (ok, out, _) = cli(net, "alpha", &["network", "list"]);
    assert!(
        ok && out.contains("default") && out.contains("over"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_networks_across_three_hosts() {
    let Some(mut net) = cluster().await else {
        return;
    };
    let admin = net.client(0);
    admin.create_project("alpha").await.unwrap();
    admin.create_project("beta").await.unwrap();
    let alpha = admin.with_project("alpha");
    let beta = admin.with_project("beta");

    // Same project, different hosts: VXLAN.
    let a1 = launch(&net, &alpha, "a1", 0, |_| {}).await;
    let a2 = launch(&net, &alpha, "a2", 1, |_| {}).await;
    assert!(
        reaches(&alpha, "a1", &ip(&a2), 80).await,
        "a1 -> a2 over VXLAN\n{}",
        diag(&net)
    );
    assert!(
        reaches(&alpha, "a2", &ip(&a1), 80).await,
        "a2 -> a1 over VXLAN"
    );
    assert!(ping_ok(&alpha, "a1", &ip(&a2)).await, "ICMP a1 -> a2");
    // Host h0's own stack reaches a2 on h1 too (its traffic leaves with h0's underlay address).
    let from_host = run(
        &net,
        0,
        "sh",
        &[
            "-c",
            &format!(
                "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | busybox nc -w 2 {} 80",
                ip(&a2)
            ),
        ],
    );
    assert!(
        from_host.contains("a2"),
        "host h0 -> a2: {from_host:?}\n{}",
        diag(&net)
    );
    let fdb = run(&net, 0, "bridge", &["fdb", "show", "dev", "nimbusv100"]);
    assert!(
        fdb.contains(
            &a2.status
                .ip
                .clone()
                .map(|_| nimbus_api::instance_mac(&a2.meta.id))
                .unwrap()
        ),
        "{fdb}"
    );
    assert!(
        !fdb.contains("00:00:00:00:00:00"),
        "no flooding entry: {fdb}"
    );

    // Two projects: no traffic either way (b1 shares host h1 with a2, and h0 with a1).
    let b1 = launch(&net, &beta, "b1", 1, |_| {}).await;
    let b0 = launch(&net, &beta, "b0", 0, |_| {}).await;
    for (c, from, to) in [
        (&alpha, "a2", ip(&b1)),
        (&beta, "b1", ip(&a2)),
        (&alpha, "a1", ip(&b1)),
        (&beta, "b1", ip(&a1)),
        (&alpha, "a1", ip(&b0)),
        (&beta, "b0", ip(&a1)),
    ] {
        assert!(
            !http_ok(c, from, &to, 80).await,
            "{from} reached {to} over TCP"
        );
        assert!(
            !ping_ok(c, from, &to).await,
            "{from} reached {to} over ICMP"
        );
    }
    assert!(
        reaches(&beta, "b0", &ip(&b1), 80).await,
        "beta's own instances talk"
    );

    // Security group: web admits only its members until a rule lets `default` in on 8080.
    alpha.create_security_group("web", "").await.unwrap();
    let a3 = launch(&net, &alpha, "a3", 2, |r| {
        r.security_groups = vec!["web".into()];
    })
    .await;
    assert!(
        !http_ok(&alpha, "a1", &ip(&a3), 8080).await,
        "web must block a1"
    );
    let (ok, out, err) = cli(
        &net,
        "alpha",
        &[
            "sg", "rule", "add", "web", "--proto", "tcp", "--ports", "8080", "--group", "default",
        ],
    );
    assert!(ok, "{err}");
    let rule_id = out.split_whitespace().nth(1).expect("rule id").to_string();
    let opened_at = Instant::now();
    let opened = eventually(Duration::from_secs(5), || async {
        http_ok(&alpha, "a1", &ip(&a3), 8080).await.then_some(())
    })
    .await;
    assert!(
        opened.is_some(),
        "the new rule never took effect\n{}",
        agent_logs(&net)
    );
    eprintln!(
        "rule took effect after {:?} (incl. exec round trips)",
        opened_at.elapsed()
    );
    assert!(
        !http_ok(&alpha, "a1", &ip(&a3), 80).await,
        "only 8080 was opened"
    );
    assert!(
        !http_ok(&alpha, "a3", &ip(&a1), 80).await,
        "default admits only its own members, not a3"
    );

    // Bad input, now that alpha has a network, a group and instances.
    alpha
        .create_network(&CreateNetworkRequest {
            name: "over".into(),
            cidr: Some("10.88.0.0/16".into()),
            subnets: vec![],
        })
        .await
        .unwrap();
    bad_input(&net, &alpha).await;

    // Egress NAT: a1 reaches the test process on the underlay as its host's address.
    let gw = net.underlay_gateway();
    let listener = tokio::net::TcpListener::bind(format!("{gw}:0"))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (mut s, peer) = listener.accept().await.unwrap();
        let mut buf = [0u8; 512];
        let _ = tokio::io::AsyncReadExt::read(&mut s, &mut buf).await;
        let _ = tokio::io::AsyncWriteExt::write_all(&mut s, b"HTTP/1.0 200 OK\r\n\r\nnat-ok").await;
        peer
    });
    let answer = http(&alpha, "a1", &gw, port).await;
    assert!(answer.contains("nat-ok"), "{answer:?}");
    let peer = server.await.unwrap();
    assert_eq!(
        peer.ip().to_string(),
        net.hosts[0].addr,
        "masqueraded to host h0's address"
    );

    // Published port: host h1's underlay address forwards 18080 to a4:80.
    launch(&net, &alpha, "a4", 1, |r| {
        r.publish = vec!["18080:80".into()];
    })
    .await;
    let h1 = net.hosts[1].addr.clone();
    let body = eventually(Duration::from_secs(5), || async {
        nimbus_testkit::http_get(&h1, 18080).filter(|body| body.contains("a4"))
    })
    .await;
    assert!(
        body.is_some(),
        "published port 18080 on h1 never answered\n{}",
        diag(&net)
    );
    let e = alpha
        .create_instance(
            &CreateInstanceRequest {
                name: "a5".into(),
                image: "busybox".into(),
                constraints: vec!["host=h1".into()],
                publish: vec!["18080:80".into()],
                ..Default::default()
            },
            None,
        )
        .await
        .expect_err("port taken on h1");
    let e = e.api().unwrap().clone();
    assert_eq!(
        (e.code, e.field.as_deref()),
        (ErrorCode::Conflict, Some("publish")),
        "{e:?}"
    );
    assert!(
        alpha.get_instance("a5").await.is_err(),
        "nothing half-applied"
    );

    // Kill host h1's agent: connectivity stays; drift made meanwhile is repaired on restart.
    net.kill9_agent(1);
    assert!(
        http_ok(&alpha, "a1", &ip(&a2), 80).await,
        "a1 -> a2 with h1's agent dead"
    );
    let vx = "nimbusv100";
    let mac0 = nimbus_api::instance_mac(&a1.meta.id);
    let out = net
        .run_in(
            1,
            "bridge",
            &["fdb", "del", &mac0, "dev", vx, "dst", &net.hosts[0].addr],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    run(
        &net,
        1,
        "nft",
        &["flush", "set", "inet", "nimbus", "in_any"],
    );
    net.restart_agent(1).unwrap();
    let repaired = eventually(Duration::from_secs(20), || async {
        let fdb = run(&net, 1, "bridge", &["fdb", "show", "dev", vx]);
        let set = run(&net, 1, "nft", &["list", "set", "inet", "nimbus", "in_any"]);
        (fdb.contains(&mac0) && set.contains(&format!("{} . {}", ip(&a2), ip(&a1)))).then_some(())
    })
    .await;
    assert!(
        repaired.is_some(),
        "h1's restarted agent did not repair\n{}",
        agent_logs(&net)
    );
    assert!(
        http_ok(&alpha, "a2", &ip(&a1), 80).await,
        "a2 -> a1 after the restart"
    );

    // Idempotence: a quiet period (the agents re-read the datapath every 10 s) changes nothing.
    let quiet_from: Vec<usize> = (0..3).map(|h| net.agent_log(h).len()).collect();
    tokio::time::sleep(Duration::from_secs(11)).await;
    for h in 0..3 {
        let log = net.agent_log(h);
        let new = &log[quiet_from[h]..];
        assert!(
            !new.contains("datapath converged"),
            "h{h} changed its datapath without a new map:\n{new}"
        );
    }

    // The rule goes away again.
    let (ok, _, err) = cli(&net, "alpha", &["sg", "rule", "delete", "web", &rule_id]);
    assert!(ok, "{err}");
    let closed = eventually(Duration::from_secs(5), || async {
        (!http_ok(&alpha, "a1", &ip(&a3), 8080).await).then_some(())
    })
    .await;
    assert!(closed.is_some(), "the deleted rule still admits traffic");

    // Counters reach the node's status.
    let counted = eventually(Duration::from_secs(25), || async {
        let nodes = admin.list_nodes().await.ok()?;
        let h0 = nodes.into_iter().find(|n| n.meta.name == "h0")?;
        let c = h0.interfaces.iter().find(|c| c.instance == a1.meta.id)?;
        (c.rx_bytes > 0 && c.tx_bytes > 0 && c.rx_packets > 0).then_some(c.clone())
    })
    .await;
    assert!(counted.is_some(), "no interface counters for a1 on h0");

    // Delete everything: no interfaces, FDB entries or nftables objects are left.
    for (c, names) in [
        (&alpha, vec!["a1", "a2", "a3", "a4"]),
        (&beta, vec!["b1", "b0"]),
    ] {
        for n in names {
            c.delete_instance(n).await.unwrap();
        }
    }
    let gone = eventually(Duration::from_secs(60), || async {
        let left =
            alpha.list_instances().await.ok()?.len() + beta.list_instances().await.ok()?.len();
        (left == 0).then_some(())
    })
    .await;
    assert!(gone.is_some(), "instances were not deleted");
    for n in ["default", "over"] {
        alpha.delete_network(n).await.unwrap();
    }
    alpha.delete_security_group("web").await.unwrap();
    admin.delete_project("alpha").await.unwrap();
    admin.delete_project("beta").await.unwrap();
    let clean = eventually(Duration::from_secs(30), || async {
        for h in 0..3 {
            let links = run(&net, h, "ip", &["-o", "link", "show"]);
            let tables = run(&net, h, "nft", &["list", "tables"]);
            let fdb = run(&net, h, "bridge", &["fdb", "show"]);
            if links.contains("nimbus")
                || links.contains(": nv")
                || tables.contains("nimbus")
                || fdb.contains("nimbusv")
            {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(
        clean.is_some(),
        "leftovers: {}\n{}",
        (0..3)
            .map(|h| format!(
                "h{h}: {} {}",
                run(&net, h, "ip", &["-o", "link", "show"]),
                run(&net, h, "nft", &["list", "tables"])
            ))
            .collect::<Vec<_>>()
            .join("\n"),
        agent_logs(&net)
    );
}
