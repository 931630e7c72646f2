//! Tenant-network benchmarks (ignored by default; `scripts/bench-net` runs them in release
//! mode), on the netns multi-host harness (`testkit::netns`) with real containers:
//!
//! - `bench_throughput`: TCP throughput (iperf3, `NET_SECS` s, `NET_TRIALS` runs, median)
//!   between two containers on different hosts (VXLAN), between two containers on one host
//!   (bridge), and across a plain veth pair between two namespaces (the baseline), in the same
//!   invocation; reported as ratios to the baseline. iperf3 runs from the host inside each
//!   container's network namespace (busybox has no iperf3), so the packets take exactly the
//!   containers' path. Every iperf3 (all three paths alike) runs at `SCHED_FIFO` priority 50
//!   (`chrt -f 50`), clients pinned to CPU 0 and servers to CPU 1 (`iperf3 -A`): on this shared
//!   machine other processes would otherwise preempt the transfer at random, and where the
//!   scheduler put client and server decided the figure more than the path did.
//! - `bench_rule_propagation`: with `NET_RULES` (1000) rules in a group whose members run on
//!   all three hosts, the time from the API call adding a rule until every host's kernel has
//!   the rule's nftables element (`nft get element`, polled by one thread per host, so a figure
//!   includes up to one probe, ~10-40 ms here), `NET_RULE_TRIALS` (100) times; median and p99.
//!
//! Results are printed and, with `NET_BENCH_OUT=<file>`, appended as markdown.

use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nimbus_api::{AddRuleRequest, CreateInstanceRequest, InstanceState};
use nimbus_client::Client;
use nimbus_testkit::netns::{self, Net};
use nimbus_testkit::{eventually, have, require};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn report(md: &str) {
    println!("{md}");
    if let Ok(path) = std::env::var("NET_BENCH_OUT") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{md}");
        }
    }
}

fn pct<T: Copy + Default>(sorted: &[T], p: f64) -> T {
    if sorted.is_empty() {
        return T::default();
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

async fn cluster() -> Option<Net> {
    if !(require(
        "root, ip, tc, nft, nsenter (netns harness)",
        netns::available(),
    ) && require("runc", have("runc"))
        && require("iperf3", have("iperf3"))
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
    eventually(Duration::from_secs(60), || async {
        let images = c.list_images().await.ok()?;
        (c.list_nodes().await.ok()?.len() == 3 && images.iter().any(|i| i.meta.name == "busybox"))
            .then_some(())
    })
    .await
    .expect("agents registered");
    Some(net)
}

async fn launch(c: &Client, name: &str, host: usize, groups: &[&str]) -> nimbus_api::Instance {
    c.create_instance(
        &CreateInstanceRequest {
            name: name.into(),
            image: "busybox".into(),
            memory: Some(serde_json::json!("32M")),
            cpus: Some(0.2),
            constraints: vec![format!("host=h{host}")],
            security_groups: groups.iter().map(|g| (*g).to_string()).collect(),
            command: vec!["sleep".into(), "36000".into()],
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("launch {name}: {e}"));
    eventually(Duration::from_secs(60), || async {
        c.get_instance(name)
            .await
            .ok()
            .filter(|i| i.status.state == InstanceState::Running)
    })
    .await
    .unwrap_or_else(|| panic!("{name} never ran"))
}

/// The nsenter argument entering instance `i`'s network namespace; it runs on host `host`,
/// whose agent names namespaces under its runtime scope (as the container driver's `net_key`).
fn netns_of(net: &Net, host: usize, i: &nimbus_api::Instance) -> String {
    let key = nimbus_net::scoped_key(Some(&net.runtime_scope(host)), &i.meta.id);
    format!("--net={}", nimbus_net::netns_path(&key).display())
}

/// iperf3 client in namespace `client_ns` (an nsenter `--net=` argument) against the server
/// at `ip`; Gbit/s received.
fn iperf(client_ns: &str, ip: &str, secs: u64) -> f64 {
    let out = Command::new("nsenter")
        .args([
            client_ns, "chrt", "-f", "50", "iperf3", "-A", "0", "-c", ip, "-J",
        ])
        .args(["-t", &secs.to_string()])
        .output()
        .expect("iperf3");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 output: {e}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("no throughput in {v}"))
        / 1e9
}

/// The CPU the iperf3 servers run on: another than the clients' CPU 0 where there is one.
fn server_cpu() -> &'static str {
    if std::thread::available_parallelism().map_or(1, std::num::NonZero::get) > 1 {
        "1"
    } else {
        "0"
    }
}

fn iperf_server(ns: &str) -> std::process::Child {
    let child = Command::new("nsenter")
        .args([ns, "chrt", "-f", "50", "iperf3", "-A", server_cpu(), "-s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(300));
    child
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect(args[0]);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces joined by a plain veth pair (the baseline), removed on drop.
struct VethPair(String, String);

impl VethPair {
    fn new(tag: &str) -> Self {
        let (a, b) = (format!("nbv{tag}a"), format!("nbv{tag}b"));
        for ns in [&a, &b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            sh(&["ip", "netns", "add", ns]);
        }
        sh(&[
            "ip", "link", "add", "nbvx", "netns", &a, "type", "veth", "peer", "name", "nbvy",
            "netns", &b,
        ]);
        for (ns, dev, addr) in [(&a, "nbvx", "10.77.0.1/24"), (&b, "nbvy", "10.77.0.2/24")] {
            sh(&["ip", "-n", ns, "addr", "add", addr, "dev", dev]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
        }
        Self(a, b)
    }
}

impl Drop for VethPair {
    fn drop(&mut self) {
        for ns in [&self.0, &self.1] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    pct(&v, 0.5)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-net"]
async fn bench_throughput() {
    let Some(net) = cluster().await else {
        return;
    };
    let secs = env_num("NET_SECS", 5);
    let trials = env_num("NET_TRIALS", 3);
    let c = net.client(0);
    let server = launch(&c, "srv", 0, &[]).await;
    let same = launch(&c, "same", 0, &[]).await;
    let remote = launch(&c, "remote", 1, &[]).await;
    let sip = server.status.ip.clone().unwrap();
    let mut srv = iperf_server(&netns_of(&net, 0, &server));
    let pair = VethPair::new(&net.slot().to_string());
    let mut base_srv = iperf_server(&format!("--net=/run/netns/{}", pair.1));
    let base_ns = format!("--net=/run/netns/{}", pair.0);
    let (mut vx, mut br, mut base) = (Vec::new(), Vec::new(), Vec::new());
    let mut rounds = Vec::new();
    for _ in 0..trials {
        // Interleaved, so drift of the shared machine hits all three alike.
        base.push(iperf(&base_ns, "10.77.0.2", secs));
        vx.push(iperf(&netns_of(&net, 1, &remote), &sip, secs));
        br.push(iperf(&netns_of(&net, 0, &same), &sip, secs));
        let (b, v, r) = (base[base.len() - 1], vx[vx.len() - 1], br[br.len() - 1]);
        rounds.push(format!("{:.2}/{:.2}", v / b, r / b));
    }
    let _ = srv.kill();
    let _ = base_srv.kill();
    let _ = srv.wait();
    let _ = base_srv.wait();
    let (vx, br, base) = (median(vx), median(br), median(base));
    report(&format!(
        "| TCP throughput, {trials} x {secs} s iperf3, median | Gbit/s | ratio to veth pair |\n|---|---|---|\n\
         | plain veth pair between two namespaces (baseline) | {base:.2} | 1.00 |\n\
         | container to container, same host (bridge) | {br:.2} | {:.2} |\n\
         | container to container, two hosts (VXLAN) | {vx:.2} | {:.2} |\n",
        br / base,
        vx / base
    ));
    report(&format!(
        "Per round, VXLAN/veth and bridge/veth: {}\n",
        rounds.join(", ")
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-net"]
async fn bench_rule_propagation() {
    let Some(net) = cluster().await else {
        return;
    };
    let rules = env_num("NET_RULES", 1000);
    let trials = env_num("NET_RULE_TRIALS", 100);
    let c = net.client(0);
    c.create_security_group("bench", "").await.unwrap();
    let mut members = Vec::new();
    for h in 0..3 {
        members.push(launch(&c, &format!("m{h}"), h, &["bench"]).await);
    }
    let rule = |port: u64, cidr: String| AddRuleRequest {
        direction: None,
        protocol: "tcp".into(),
        ports: Some(port.to_string()),
        cidr: Some(cidr),
        group: None,
        description: String::new(),
    };
    let started = Instant::now();
    for k in 0..rules {
        let cidr = format!("10.{}.{}.0/24", 100 + k / 250, k % 250);
        c.add_rule("bench", &rule(10_000 + k, cidr)).await.unwrap();
    }
    eprintln!("{rules} rules added in {:?}", started.elapsed());
    // Every host holds the last of them before the trials start.
    let probe = |h: usize, elem: String| {
        let out = net
            .run_in(
                h,
                "nft",
                &[
                    "get",
                    "element",
                    "inet",
                    "nimbus",
                    "in_ports",
                    &format!("{{ {elem} }}"),
                ],
            )
            .expect("nft");
        out.status.success()
    };
    let last = |m: &nimbus_api::Instance, k: u64| {
        format!(
            "{} . 10.{}.{}.0/24 . tcp . {}",
            m.status.ip.as_deref().unwrap(),
            100 + k / 250,
            k % 250,
            10_000 + k
        )
    };
    let ready = eventually(Duration::from_secs(120), || async {
        (0..3)
            .all(|h| probe(h, last(&members[h], rules - 1)))
            .then_some(())
    })
    .await;
    assert!(
        ready.is_some(),
        "the {rules} rules never reached every host"
    );
    let mut took = Vec::new();
    for t in 0..trials {
        let k = rules + t;
        let t0 = Instant::now();
        c.add_rule(
            "bench",
            &rule(10_000 + k, format!("10.{}.{}.0/24", 100 + k / 250, k % 250)),
        )
        .await
        .unwrap();
        // One poller per host, each timing its own host (a probe is one `nft get element`).
        let seen: Vec<Duration> = std::thread::scope(|sc| {
            let probes: Vec<_> = (0..3)
                .map(|h| {
                    let elem = last(&members[h], k);
                    let probe = &probe;
                    sc.spawn(move || loop {
                        if probe(h, elem.clone()) {
                            return t0.elapsed();
                        }
                        assert!(
                            t0.elapsed() < Duration::from_secs(30),
                            "rule {k} never reached h{h}"
                        );
                    })
                })
                .collect();
            probes
                .into_iter()
                .map(|p| p.join().expect("poller"))
                .collect()
        });
        took.push(seen.into_iter().max().unwrap_or_default());
    }
    took.sort();
    let ms = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1000.0);
    report(&format!(
        "| rule change to enforcement on all 3 hosts ({rules} rules in place, {trials} changes) | median ms | p99 ms | max ms |\n|---|---|---|---|\n\
         | add one rule, until every host's nftables set holds it | {} | {} | {} |\n",
        ms(pct(&took, 0.5)),
        ms(pct(&took, 0.99)),
        ms(*took.last().unwrap())
    ));
}
