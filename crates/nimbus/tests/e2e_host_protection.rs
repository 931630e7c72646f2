//! End to end: instances cannot reach the node's own services. From a container of a real
//! `nimbus up`, a host listener bound to 0.0.0.0 and the nimbus API port answer on none of the
//! host's addresses (its bridge gateway, another bridge's gateway, its outside address), while what nimbus serves the container on purpose does: a load-balancer listener
//! and a published port, on the same addresses. Once the node has no instances left, its
//! nftables tables are gone.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use nimbus_api::{CreateInstanceRequest, InstanceState};
use nimbus_client::Client;
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

/// `nft list table inet NAME` (diagnostics).
fn nft_table(name: &str) -> String {
    std::process::Command::new("nft")
        .args(["list", "table", "inet", name])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The host's address towards the outside (the source of its default route), if any.
fn outside_address() -> Option<String> {
    let o = std::process::Command::new("ip")
        .args(["-4", "route", "get", "192.0.2.1"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let mut w = text.split_whitespace();
    w.find(|x| *x == "src")?;
    w.next().map(str::to_string)
}

/// Another bridge of the host with its own gateway address (removed on drop): instances must
/// not reach the host through any bridge's address, not only their own.
struct OtherBridge {
    name: String,
    addr: String,
}

impl OtherBridge {
    fn new(slot: u8) -> Self {
        let name = format!("nhp{slot}");
        let addr = format!("10.254.{slot}.1");
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        for args in [
            vec!["link", "add", &name, "type", "bridge"],
            vec!["addr", "add", &format!("{addr}/24"), "dev", &name],
            vec!["link", "set", &name, "up"],
        ] {
            let ok = std::process::Command::new("ip")
                .args(&args)
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ip {args:?}");
        }
        Self { name, addr }
    }
}

impl Drop for OtherBridge {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.name])
            .status();
    }
}

/// A TCP listener on 0.0.0.0 answering every connection with an HTTP 200 `host-secret`.
async fn host_listener() -> u16 {
    let l = tokio::net::TcpListener::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let port = l.local_addr().expect("addr").port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                // Read the request first: closing with unread bytes would reset the answer.
                let mut buf = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nhost-secret\n").await;
                let _ = s.shutdown().await;
            });
        }
    });
    port
}

async fn launch(c: &Client, name: &str, labels: &[(&str, &str)], publish: Vec<String>) {
    c.create_instance(
        &CreateInstanceRequest {
            name: name.into(),
            image: "busybox".into(),
            memory: Some(serde_json::json!("32M")),
            cpus: Some(0.2),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect::<BTreeMap<_, _>>(),
            publish,
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
    .unwrap_or_else(|e| panic!("launch {name}: {e}"));
}

/// For each `addr:port`, what `GET /` from inside `from` got, on one line (busybox nc, 2 s
/// connect timeout; empty when nothing answered).
async fn answers(c: &Client, from: &str, targets: &[(String, u16)]) -> Vec<String> {
    let mut script = String::new();
    for (a, p) in targets {
        // stdin stays open a moment: busybox nc stops reading once it ends.
        let _ = writeln!(
            script,
            "(printf 'GET / HTTP/1.0\\r\\n\\r\\n'; sleep 1) | nc -w 2 {a} {p} | tr -d '\\r' | tr '\\n' ' '; echo"
        );
    }
    let r = c
        .exec(from, vec!["sh".into(), "-c".into(), script])
        .await
        .unwrap_or_else(|e| panic!("exec in {from}: {e}"));
    let mut lines: Vec<String> = r.stdout.lines().map(str::to_string).collect();
    lines.resize(targets.len(), String::new());
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_reach_only_what_nimbus_serves_them_on_the_host() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    let base = 18_600 + u16::from(cloud.slot()) * 4;
    let (lb_port, pub_port) = (base, base + 1);
    let secret_port = host_listener().await;
    let api_port: u16 = cloud
        .url
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("API port");

    launch(
        &c,
        "web",
        &[("app", "web")],
        vec![format!("{pub_port}:8080")],
    )
    .await;
    launch(&c, "probe", &[], Vec::new()).await;
    for name in ["web", "probe"] {
        eventually(Duration::from_secs(60), || async {
            c.get_instance(name)
                .await
                .ok()
                .filter(|i| i.status.state == InstanceState::Running)
        })
        .await
        .unwrap_or_else(|| panic!("{name} not running\n{}", cloud.log()));
    }
    let o = run(
        &cloud,
        &[
            "lb",
            "create",
            "front",
            "--listen",
            &format!("{lb_port}:8080/http"),
            "--backend-label",
            "app=web",
        ],
    );
    assert!(o.status.success(), "{o:?}");

    // The probe's gateway: the first address of its subnet, on the node's bridge.
    let probe_ip = c
        .get_instance("probe")
        .await
        .unwrap()
        .status
        .ip
        .expect("probe address");
    let gateway = {
        let mut o: Vec<&str> = probe_ip.split('.').collect();
        o[3] = "1";
        o.join(".")
    };
    // The node's addresses: this bridge's gateway, another bridge's, the outside one.
    let other = OtherBridge::new(cloud.slot());
    let mut addrs = vec![gateway, other.addr.clone()];
    addrs.extend(outside_address().filter(|a| !a.starts_with("127.")));

    // The listener is really there: the host itself gets it on every address.
    for a in &addrs {
        let got = nimbus_testkit::http_get(a, secret_port).unwrap_or_default();
        assert!(got.contains("host-secret"), "host listener on {a}: {got:?}");
    }

    // What nimbus serves the instance answers (through the gateway and the host's other
    // addresses): the LB listener (once it runs) and the published port.
    let served: Vec<(String, u16)> = addrs
        .iter()
        .flat_map(|a| [(a.clone(), lb_port), (a.clone(), pub_port)])
        .collect();
    let ok = eventually(Duration::from_secs(30), || async {
        let got = answers(&c, "probe", &served).await;
        got.iter()
            .all(|l| l.contains("200 OK") && l.contains("web"))
            .then_some(())
    })
    .await;
    assert!(
        ok.is_some(),
        "served ports not reachable from the container: {:?}\n{:?}\n{}\n{}",
        answers(&c, "probe", &served).await,
        served,
        nft_table(&cloud.bridge),
        cloud.log()
    );

    // Everything else of the host answers on none of its addresses.
    let private: Vec<(String, u16)> = addrs
        .iter()
        .flat_map(|a| [(a.clone(), secret_port), (a.clone(), api_port)])
        .collect();
    let got = answers(&c, "probe", &private).await;
    let leaks: Vec<_> = private
        .iter()
        .zip(&got)
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    assert!(
        leaks.is_empty(),
        "the container reached host services: {leaks:?}"
    );
    // The container's own network works (not a dead container): it reaches the web instance.
    let web_ip = c.get_instance("web").await.unwrap().status.ip.unwrap();
    let got = answers(&c, "probe", &[(web_ip, 8080)]).await;
    assert!(got[0].contains("200 OK"), "{got:?}");

    // No instances left: the node's tables (host protection included) are removed.
    assert!(run(&cloud, &["lb", "delete", "front"]).status.success());
    for name in ["web", "probe"] {
        c.delete_instance(name).await.expect("delete");
    }
    let table = cloud.bridge.clone();
    let gone = eventually(Duration::from_secs(30), || async {
        let o = std::process::Command::new("nft")
            .args(["list", "tables"])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        (!text
            .lines()
            .any(|l| l.split_whitespace().nth(2) == Some(table.as_str())))
        .then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "tables of {table} left after the last instance"
    );
}
