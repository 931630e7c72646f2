//! HA benchmarks (ignored by default; `scripts/bench-failover` runs them in release mode):
//!
//! - `bench_leader_failover`: three servers in network namespaces; kill -9 the leader and
//!   time until the first write through a surviving server succeeds; restart it; repeat.
//! - `bench_node_failure`: two agents (root namespace) on the three-server cluster; kill -9
//!   the agent holding `restart: always` containers and time until they run on the other.
//! - `bench_writes_vs_etcd`: write throughput and latency of the 3-server cluster against a
//!   3-member etcd on the same namespace layout, same client, same concurrency (`HA_SINGLE`
//!   sequential writes, then `HA_CLIENTS` clients for `HA_SECS`).
//!
//! Results are printed as `BENCH` lines and, with `HA_BENCH_OUT=<file>`, appended as markdown.

use std::io::{BufRead, BufReader, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nimbus_api::{CreateInstanceRequest, InstanceState, RestartPolicy};
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
    if let Ok(path) = std::env::var("HA_BENCH_OUT") {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(f, "{md}");
        }
    }
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

async fn cluster(extra: &[&str]) -> Option<Net> {
    if !require("root, ip, tc and nft (netns harness)", netns::available()) {
        return None;
    }
    let mut net = Net::new(bin(), 3).expect("netns hosts");
    net.start_servers(extra).expect("start servers");
    net.wait_cluster(&[0, 1, 2], 3, Duration::from_secs(60))
        .await
        .expect("cluster formed");
    Some(net)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-failover"]
async fn bench_leader_failover() {
    let Some(mut net) = cluster(&[]).await else {
        return;
    };
    let trials = env_num("HA_TRIALS", 20);
    let mut took = Vec::new();
    for t in 0..trials {
        let l = net
            .wait_cluster(&[0, 1, 2], 3, Duration::from_secs(60))
            .await
            .expect("cluster");
        // The restarted server must have caught up (it answers a linearizable read).
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let survivors: Vec<_> = (0..3)
            .filter(|&i| i != l)
            .map(|i| net.client(i).with_timeout(Duration::from_secs(1)))
            .collect();
        let t0 = Instant::now();
        net.kill9(l);
        let mut n = 0;
        loop {
            let c = &survivors[n % survivors.len()];
            n += 1;
            if c.create_project(&format!("fo-{t}-{n}")).await.is_ok() {
                break;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "no failover in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let d = t0.elapsed();
        eprintln!("trial {t}: leader host {l} killed, first write after {d:?}");
        took.push(d);
        net.start_server(l).expect("restart");
    }
    took.sort();
    report(&format!(
        "| leader failover (kill -9 leader -> first acknowledged write via a survivor), {trials} trials | median {} ms | max {} ms | min {} ms |",
        ms(pct(&took, 0.5)),
        ms(*took.last().unwrap_or(&Duration::ZERO)),
        ms(took[0])
    ));
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The runtime scope of agent `name` in the net's slot (unique among concurrent runs).
fn scope(net: &Net, name: &str) -> String {
    format!("hab{}-{name}", net.slot())
}

/// Removes what the node-failure benchmark's agents and datapath left, also when it panics:
/// the containers of both agents' scopes and the datapath names of its prefix.
struct NodeFailureCleanup {
    agents: Vec<(String, PathBuf)>,
    prefix: String,
}

impl Drop for NodeFailureCleanup {
    fn drop(&mut self) {
        for (scope, dir) in &self.agents {
            nimbus_testkit::remove_agent_containers(scope, dir);
            // The agent's runc root, empty once its containers are gone.
            let root = Path::new("/run/nimbus").join(scope);
            let _ = std::fs::remove_dir(root.join("runc"));
            let _ = std::fs::remove_dir(root);
        }
        nimbus_testkit::remove_datapath(&self.prefix);
    }
}

fn start_agent(net: &Net, name: &str, dir: &Path) -> Proc {
    let mut cmd = Command::new(bin());
    cmd.arg("agent");
    for u in net.urls() {
        cmd.args(["--server", &u]);
    }
    let log = std::fs::File::create(dir.with_extension("log")).expect("log");
    let mut child = cmd
        .arg("--token-file")
        .arg(&net.node_token_file)
        .args(["--name", name, "--data-dir"])
        .arg(dir)
        .args(["--listen", "127.0.0.1:0"])
        // Two agents on this machine: keep their containers (same instance ids) apart, and
        // give each its own nftables table.
        .args(["--runtime-scope", &scope(net, name)])
        .args(["--nft-table", &format!("nhb{}_{name}", net.slot())])
        .env("NIMBUS_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("agent");
    let out = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(out).lines();
    let ready = lines.any(|l| l.is_ok_and(|l| l.contains("ready")));
    assert!(ready, "agent {name} did not start");
    Proc(child)
}

fn instance(name: &str) -> CreateInstanceRequest {
    CreateInstanceRequest {
        name: name.into(),
        image: "busybox".into(),
        memory: Some(serde_json::json!("16M")),
        cpus: Some(0.1),
        restart: RestartPolicy::Always,
        command: vec!["sleep".into(), "3600".into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-failover"]
async fn bench_node_failure() {
    if !require("runc", have("runc"))
        || !require("/bin/busybox", Path::new("/bin/busybox").exists())
        || !require("root, ip, tc and nft (netns harness)", netns::available())
    {
        return;
    }
    let grace = env_num("HA_GRACE", 3);
    let trials = env_num("HA_NODE_TRIALS", 3);
    let count = 3;
    let mut net = Net::new(bin(), 3).expect("netns hosts");
    let s = net.slot();
    let (g, bridge, pool) = (
        grace.to_string(),
        format!("nhb{s}"),
        format!("10.{}.0.0/16", 230 + u32::from(s % 20)),
    );
    net.start_servers(&[
        "--heartbeat-grace",
        &g,
        "--net-prefix",
        &bridge,
        "--network-pool",
        &pool,
    ])
    .expect("servers");
    net.wait_cluster(&[0, 1, 2], 3, Duration::from_secs(60))
        .await
        .expect("cluster");
    let dirs: Vec<PathBuf> = ["n1", "n2"]
        .iter()
        .map(|n| net.scratch().join(format!("agent-{n}")))
        .collect();
    let names = ["n1", "n2"];
    let _cleanup = NodeFailureCleanup {
        agents: names
            .iter()
            .zip(&dirs)
            .map(|(n, d)| (scope(&net, n), d.clone()))
            .collect(),
        prefix: bridge.clone(),
    };
    let mut agents: Vec<Option<Proc>> = vec![
        Some(start_agent(&net, names[0], &dirs[0])),
        Some(start_agent(&net, names[1], &dirs[1])),
    ];
    let c = net.client(1);
    eventually(Duration::from_secs(60), || async {
        let nodes = c.list_nodes().await.ok()?;
        (nodes.len() == 2).then_some(())
    })
    .await
    .expect("two nodes registered");
    eventually(Duration::from_secs(60), || async {
        let images = c.list_images().await.ok()?;
        let projects = c.list_projects().await.ok()?;
        (images.iter().any(|i| i.meta.name == "busybox")
            && projects.iter().any(|p| p.meta.name == "default"))
        .then_some(())
    })
    .await
    .expect("cluster defaults written");
    c.cordon_node(names[1], true).await.expect("cordon");
    for k in 0..count {
        c.create_instance(&instance(&format!("ha{k}")), None)
            .await
            .expect("create");
    }
    let on = |node: &'static str| {
        let c = c.clone();
        async move {
            eventually(Duration::from_secs(120), || async {
                let list = c.list_instances().await.ok()?;
                (list.len() == count
                    && list.iter().all(|i| {
                        i.status.state == InstanceState::Running
                            && i.status.node.as_deref() == Some(node)
                    }))
                .then_some(())
            })
            .await
        }
    };
    on(names[0]).await.expect("running on n1");
    c.cordon_node(names[1], false).await.expect("uncordon");
    let mut took = Vec::new();
    let mut from = 0;
    for t in 0..trials {
        let to = 1 - from;
        let t0 = Instant::now();
        agents[from] = None; // SIGKILL
        on(names[to])
            .await
            .unwrap_or_else(|| panic!("trial {t}: instances never moved"));
        let d = t0.elapsed();
        eprintln!(
            "trial {t}: {} killed, {count} instances running on {} after {d:?}",
            names[from], names[to]
        );
        took.push(d);
        // The dead node comes back and removes what moved away (fencing).
        agents[from] = Some(start_agent(&net, names[from], &dirs[from]));
        eventually(Duration::from_secs(60), || async {
            let nodes = c.list_nodes().await.ok()?;
            nodes
                .iter()
                .all(|n| n.state == nimbus_api::NodeState::Ready)
                .then_some(())
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        from = to;
    }
    for k in 0..count {
        let _ = c.delete_instance(&format!("ha{k}")).await;
    }
    eventually(Duration::from_secs(60), || async {
        c.list_instances().await.ok()?.is_empty().then_some(())
    })
    .await;
    drop(agents);
    took.sort();
    report(&format!(
        "| node failure (kill -9 agent -> its {count} restart=always containers running on the other node), heartbeat grace {grace} s, {trials} trials | median {} ms | max {} ms | min {} ms |",
        ms(pct(&took, 0.5)),
        ms(*took.last().unwrap_or(&Duration::ZERO)),
        ms(took[0])
    ));
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn b64(data: &[u8]) -> String {
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * k)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[derive(Clone)]
enum Target {
    Nimbus { urls: Vec<String>, token: String },
    Etcd { urls: Vec<String> },
}

impl Target {
    async fn write(&self, http: &reqwest::Client, member: usize, key: &str) -> bool {
        let rb = match self {
            Self::Nimbus { urls, token } => http
                .post(format!("{}/v1/projects", urls[member % urls.len()]))
                .bearer_auth(token)
                .json(&serde_json::json!({ "name": key })),
            Self::Etcd { urls } => http
                .post(format!("{}/v3/kv/put", urls[member % urls.len()]))
                .json(&serde_json::json!({ "key": b64(key.as_bytes()), "value": b64(b"0123456789abcdef") })),
        };
        match rb.send().await {
            Ok(r) => {
                let ok = r.status().is_success();
                let _ = r.bytes().await;
                ok
            }
            Err(_) => false,
        }
    }
}

struct Measured {
    single_p50: Duration,
    single_p99: Duration,
    rate: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

async fn measure(target: &Target, tag: &str, clients: usize, secs: u64) -> Measured {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("http");
    let errors = Arc::new(AtomicU64::new(0));
    let next = Arc::new(AtomicU64::new(0));
    let mut single = Vec::new();
    let measured = env_num("HA_SINGLE", 300);
    let warmup = measured.min(100);
    for i in 0..warmup + measured {
        let t0 = Instant::now();
        if !target.write(&http, 0, &format!("s{tag}-{i}")).await {
            errors.fetch_add(1, Ordering::Relaxed);
        }
        if i >= warmup {
            single.push(t0.elapsed());
        }
    }
    single.sort();
    let mut all = Vec::new();
    let mut rate = 0.0;
    for (secs, measured) in [(1, false), (secs, true)] {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..clients)
            .map(|c| {
                let (target, http, next, errors, tag) = (
                    target.clone(),
                    http.clone(),
                    next.clone(),
                    errors.clone(),
                    tag.to_owned(),
                );
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    while Instant::now() < deadline {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let t0 = Instant::now();
                        if target.write(&http, c, &format!("c{tag}-{i}")).await {
                            lat.push(t0.elapsed());
                        } else {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    lat
                })
            })
            .collect();
        let mut lat = Vec::new();
        for t in tasks {
            lat.extend(t.await.expect("client task"));
        }
        if measured {
            rate = lat.len() as f64 / start.elapsed().as_secs_f64();
            all = lat;
        }
    }
    all.sort();
    Measured {
        single_p50: pct(&single, 0.5),
        single_p99: pct(&single, 0.99),
        rate,
        p50: pct(&all, 0.5),
        p99: pct(&all, 0.99),
        errors: errors.load(Ordering::Relaxed),
    }
}

async fn etcd_healthy(urls: &[String]) -> bool {
    let http = reqwest::Client::new();
    for u in urls {
        let Ok(r) = http
            .get(format!("{u}/health"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
        else {
            return false;
        };
        if !r.text().await.unwrap_or_default().contains("true") {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-failover"]
async fn bench_writes_vs_etcd() {
    if !require("etcd", have("etcd")) {
        return;
    }
    let Some(mut net) = cluster(&[]).await else {
        return;
    };
    let clients = usize::try_from(env_num("HA_CLIENTS", 64)).unwrap_or(64);
    let secs = env_num("HA_SECS", 10);
    let nimbus = Target::Nimbus {
        urls: net.urls(),
        token: net.admin_token.clone(),
    };
    let n = measure(&nimbus, "n", clients, secs).await;
    for i in 0..3 {
        net.kill9(i);
    }
    let addrs: Vec<String> = net.hosts.iter().map(|h| h.addr.clone()).collect();
    let initial = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("e{i}=http://{a}:2380"))
        .collect::<Vec<_>>()
        .join(",");
    let mut etcds = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        let dir = net.scratch().join(format!("etcd{i}"));
        let args: Vec<String> = [
            "--name",
            &format!("e{i}"),
            "--data-dir",
            &dir.display().to_string(),
            "--listen-client-urls",
            &format!("http://{a}:2379"),
            "--advertise-client-urls",
            &format!("http://{a}:2379"),
            "--listen-peer-urls",
            &format!("http://{a}:2380"),
            "--initial-advertise-peer-urls",
            &format!("http://{a}:2380"),
            "--initial-cluster",
            &initial,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            &format!("nimbus-bench-{}", net.slot()),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        etcds.push(Proc(net.spawn_in(i, "etcd", "etcd", &args).expect("etcd")));
    }
    let urls: Vec<String> = addrs.iter().map(|a| format!("http://{a}:2379")).collect();
    eventually(Duration::from_secs(60), || async {
        etcd_healthy(&urls).await.then_some(())
    })
    .await
    .expect("etcd cluster healthy");
    let e = measure(&Target::Etcd { urls }, "e", clients, secs).await;
    drop(etcds);
    let version = Command::new("etcd")
        .arg("--version")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .unwrap_or_default();
    report(&format!(
        "| 3 members, writes | 1 client p50 | 1 client p99 | {clients} clients writes/s | p50 | p99 | errors |\n|---|---|---|---|---|---|---|\n| nimbus (3 servers, POST /v1/projects) | {} ms | {} ms | {:.0} | {} ms | {} ms | {} |\n| etcd ({version}, 3 members, v3 gateway put) | {} ms | {} ms | {:.0} | {} ms | {} ms | {} |\n| nimbus / etcd | {:.2}x | {:.2}x | {:.2}x | {:.2}x | {:.2}x | |",
        ms(n.single_p50), ms(n.single_p99), n.rate, ms(n.p50), ms(n.p99), n.errors,
        ms(e.single_p50), ms(e.single_p99), e.rate, ms(e.p50), ms(e.p99), e.errors,
        n.single_p50.as_secs_f64() / e.single_p50.as_secs_f64(),
        n.single_p99.as_secs_f64() / e.single_p99.as_secs_f64(),
        n.rate / e.rate,
        n.p50.as_secs_f64() / e.p50.as_secs_f64(),
        n.p99.as_secs_f64() / e.p99.as_secs_f64(),
    ));
}
