//! End to end: `nimbus up`, real busybox httpd containers behind a load balancer created with
//! the CLI; the agent's data plane answers on 127.0.0.1, follows instance changes, reports
//! backend health and exports metrics.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use nimbus_api::{CreateInstanceRequest, InstanceState};
use nimbus_testkit::{eventually, have, require, Cloud};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

fn deps() -> bool {
    require("root", nix::unistd::geteuid().is_root())
        && require("runc", have("runc"))
        && require("/bin/busybox", Path::new("/bin/busybox").exists())
        && require("nft", have("nft"))
}

fn run(cloud: &Cloud, args: &[&str]) -> Output {
    cloud.cli().args(args).output().expect("run nimbus")
}

fn out(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `GET /` through the LB on 127.0.0.1:port with a fresh connection; the body if 200.
async fn get(port: u16) -> Option<String> {
    get_host(port, None).await
}

/// `GET /` with an optional `Host` header; the body if 200.
async fn get_host(port: u16, host: Option<&str>) -> Option<String> {
    let mut req = reqwest::Client::new().get(format!("http://127.0.0.1:{port}/"));
    if let Some(h) = host {
        req = req.header("host", h);
    }
    let r = req.timeout(Duration::from_secs(3)).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    r.text().await.ok().map(|s| s.trim().to_string())
}

/// `GET /` over a plain TCP connection (HTTP/1.0); the body if 200.
fn raw_get(host: &str, port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = format!("{host}:{port}").parse().ok()?;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut r = String::new();
    s.read_to_string(&mut r).ok()?;
    let (head, body) = r.split_once("\r\n\r\n")?;
    head.lines()
        .next()?
        .contains(" 200")
        .then(|| body.trim().to_string())
}

/// The in-kernel L4 table under `prefix` whose rules forward `port`, if any.
fn lb_table(prefix: &str, port: u16) -> Option<String> {
    let o = std::process::Command::new("nft")
        .args(["list", "tables", "ip"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2))
        .filter(|t| t.starts_with(&format!("{prefix}_lb")))
        .find(|t| {
            std::process::Command::new("nft")
                .args(["list", "table", "ip", t])
                .output()
                .is_ok_and(|o| {
                    String::from_utf8_lossy(&o.stdout).contains(&format!(" dport {port} jump pick"))
                })
        })
        .map(str::to_string)
}

/// Sum of the packets of the counters named `<kind><slot>` of an `ip` table.
fn nft_counter_sum(table: &str, kind: &str) -> u64 {
    let o = std::process::Command::new("nft")
        .args(["-j", "list", "counters", "table", "ip", table])
        .output()
        .expect("nft");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i.get("counter"))
        .filter(|c| {
            c["name"]
                .as_str()
                .and_then(|n| n.strip_prefix(kind))
                .is_some_and(|d| d.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|c| c["packets"].as_u64())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_in_front_of_containers() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    let port = 18_400 + u16::from(cloud.slot()) * 4;
    for name in ["web1", "web2", "other"] {
        let mut labels = std::collections::BTreeMap::new();
        labels.insert(
            "app".to_string(),
            if name == "other" { "db" } else { "web" }.to_string(),
        );
        c.create_instance(
            &CreateInstanceRequest {
                name: name.into(),
                image: "busybox".into(),
                memory: Some(serde_json::json!("32M")),
                cpus: Some(0.2),
                labels,
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    format!("mkdir -p /www && echo {name} > /www/index.html && exec httpd -f -p 8080 -h /www"),
                ],
                ..CreateInstanceRequest::default()
            },
            None,
        )
        .await
        .expect("create instance");
    }
    for name in ["web1", "web2"] {
        eventually(Duration::from_secs(30), || async {
            c.get_instance(name)
                .await
                .ok()
                .filter(|i| i.status.state == InstanceState::Running)
        })
        .await
        .unwrap_or_else(|| panic!("{name} not running"));
    }

    // Bad inputs: one readable line, non-zero exit, nothing created.
    let listen = format!("{port}:8080/http");
    for (args, want) in [
        (vec!["--algorithm", "random"], "unknown algorithm"),
        (vec!["--backend-group", "nope"], "does not exist"),
        (vec!["--node", "nope"], "node \"nope\" does not exist"),
        (vec!["--replicas", "0"], "out of range"),
    ] {
        let mut a = vec!["lb", "create", "bad", "--listen", &listen];
        if !args.contains(&"--backend-group") {
            a.extend(["--backend-label", "app=web"]);
        }
        a.extend(args);
        let o = run(&cloud, &a);
        assert!(!o.status.success(), "{}", out(&o));
        assert!(out(&o).contains(want), "{}", out(&o));
    }
    let o = run(
        &cloud,
        &[
            "lb",
            "create",
            "bad",
            "--listen",
            "70000/http",
            "--backend-label",
            "app=web",
        ],
    );
    assert!(
        !o.status.success() && out(&o).contains("out of range"),
        "{}",
        out(&o)
    );
    assert!(c.list_lbs().await.unwrap().is_empty());

    // The create contract from the issue.
    let o = run(
        &cloud,
        &[
            "lb",
            "create",
            "web",
            "--listen",
            &listen,
            "--backend-label",
            "app=web",
            "--health-check",
            "http:/index.html,interval=300ms,healthy=1,unhealthy=2",
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    // A second LB on the same port is a conflict.
    let o = run(
        &cloud,
        &[
            "lb",
            "create",
            "web2",
            "--listen",
            &listen,
            "--backend",
            "web1",
        ],
    );
    assert!(
        !o.status.success() && out(&o).contains("already used"),
        "{}",
        out(&o)
    );

    // Traffic spreads over both web instances, never the db one.
    let mut seen = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "LB never served both backends: {seen:?}\n{}",
            cloud.log()
        );
        if let Some(b) = get(port).await {
            seen.insert(b);
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["web1", "web2"]);

    // A TCP listener over the same containers is forwarded in the kernel for clients of the
    // node's address (nftables DNAT under the cloud's datapath prefix) and relayed in user
    // space for 127.0.0.1; both reach both backends; deleting the LB removes its table.
    let tcp_port = port + 1;
    let o = run(
        &cloud,
        &[
            "lb",
            "create",
            "raw",
            "--listen",
            &format!("{tcp_port}:8080/tcp"),
            "--backend-label",
            "app=web",
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    let node_ip = c.list_nodes().await.unwrap().remove(0).underlay_ip;
    let table = eventually(Duration::from_secs(20), || async {
        lb_table(&cloud.bridge, tcp_port)
    })
    .await
    .unwrap_or_else(|| panic!("no in-kernel L4 table\n{}", cloud.log()));
    // The table picks among both backends once their first probes passed (the implicit TCP
    // check of a kernel-forwarded listener); until then the user-space listener serves.
    let picked = eventually(Duration::from_secs(10), || async {
        let o = std::process::Command::new("nft")
            .args(["list", "chain", "ip", &table, "pick"])
            .output()
            .ok()?;
        (String::from_utf8_lossy(&o.stdout).matches("jump b").count() == 2).then_some(())
    })
    .await;
    assert!(picked.is_some(), "the kernel never picks both backends");
    for host in [node_ip.as_str(), "127.0.0.1"] {
        let mut seen = std::collections::BTreeSet::new();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while seen.len() < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "TCP LB via {host} served only {seen:?}\n{}",
                cloud.log()
            );
            match raw_get(host, tcp_port) {
                Some(b) => {
                    seen.insert(b);
                }
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    let forwarded = nft_counter_sum(&table, "n");
    assert!(
        forwarded >= 2,
        "kernel forwarded {forwarded} connections\n{}",
        cloud.log()
    );
    let o = run(&cloud, &["lb", "delete", "raw"]);
    assert!(o.status.success(), "{}", out(&o));
    let gone = eventually(Duration::from_secs(10), || async {
        lb_table(&cloud.bridge, tcp_port).is_none().then_some(())
    })
    .await;
    assert!(gone.is_some(), "table {table} left after lb delete");

    // Health is reported back: `nimbus lb backends web`.
    let healthy = eventually(Duration::from_secs(10), || async {
        let b = c.lb_backends("web").await.ok()?;
        (b.len() == 2 && b.iter().all(|x| x.healthy)).then_some(b)
    })
    .await;
    assert!(healthy.is_some(), "{:?}", c.lb_backends("web").await);
    let o = run(&cloud, &["lb", "backends", "web"]);
    assert!(
        out(&o).contains("web1") && out(&o).contains("healthy"),
        "{}",
        out(&o)
    );
    let o = run(&cloud, &["lb", "list"]);
    assert!(out(&o).contains(&format!("{port}/http")), "{}", out(&o));

    // Stopping a backend takes it out of rotation.
    c.instance_action("web2", "stop").await.unwrap();
    let only_web1 = eventually(Duration::from_secs(20), || async {
        let mut all = true;
        for _ in 0..6 {
            all &= get(port).await.as_deref() == Some("web1");
        }
        all.then_some(())
    })
    .await;
    assert!(only_web1.is_some(), "web2 still gets traffic after stop");

    // Metrics on the agent's Prometheus endpoint.
    let node = c.list_nodes().await.unwrap().remove(0);
    // The agent's `/metrics` takes the metrics token `nimbus up` created.
    let metrics_token = std::fs::read_to_string(cloud.data_dir.join("metrics.token")).unwrap();
    let text = reqwest::Client::new()
        .get(format!("{}/metrics", node.agent_url))
        .bearer_auth(metrics_token.trim())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        text.contains(&format!(
            "nimbus_lb_requests_total{{lb=\"default/web:{port}\",backend=\"web1\",class=\"2xx\"}}"
        )),
        "{text}"
    );

    // A routing rule from the CLI: requests for db.example.com go to the app=db instance,
    // the others still to the default backends.
    for (route, want) in [
        ("bogus", "not KEY=VALUE"),
        ("host=a..b,backend-label=app=db", "invalid host pattern"),
        ("host=db.example.com", "exactly one"),
    ] {
        let o = run(&cloud, &["lb", "update", "web", "--route", route]);
        assert!(
            !o.status.success() && out(&o).contains(want) && out(&o).trim().lines().count() == 1,
            "{route}: {}",
            out(&o)
        );
    }
    let o = run(
        &cloud,
        &[
            "lb",
            "update",
            "web",
            "--route",
            "host=db.example.com,backend-label=app=db",
        ],
    );
    assert!(o.status.success(), "{}", out(&o));
    let o = run(&cloud, &["lb", "show", "web"]);
    assert!(
        out(&o).contains("0: host=db.example.com,backend-label=app=db"),
        "{}",
        out(&o)
    );
    let routed = eventually(Duration::from_secs(30), || async {
        let mut ok = true;
        for _ in 0..4 {
            ok &= get_host(port, Some("db.example.com")).await.as_deref() == Some("other");
            ok &= get(port).await.as_deref() == Some("web1");
        }
        ok.then_some(())
    })
    .await;
    assert!(routed.is_some(), "host route not applied\n{}", cloud.log());
    let o = run(&cloud, &["lb", "update", "web", "--no-routes"]);
    assert!(o.status.success(), "{}", out(&o));
    assert!(c.get_lb("web").await.unwrap().spec.routes.is_empty());

    // Delete: the port stops answering.
    let o = run(&cloud, &["lb", "delete", "web"]);
    assert!(o.status.success(), "{}", out(&o));
    let closed = eventually(Duration::from_secs(10), || async {
        std::net::TcpStream::connect(("127.0.0.1", port))
            .is_err()
            .then_some(())
    })
    .await;
    assert!(closed.is_some(), "listener still open after delete");
    cloud.shutdown();
}
