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
//!   Each transfer's CPU cost is measured too (`net_cpu`: `/proc/stat` busy time minus every
//!   other process's CPU time, with the iperf3s' cgroup plus ksoftirqd as a lower bound and
//!   the raw busy time as an upper bound), reported as CPU-seconds per GB received, in total
//!   and per CPU, with how busy each CPU was and a 1 s background sample before each run. With
//!   two or more CPUs, two more paths steer receive processing with RPS so that each CPU does
//!   one end's work (the veth pair's receiver, and the VXLAN receiving host's underlay device,
//!   to CPU 1; the sender's side to CPU 0): their per-CPU figures split the path's cost
//!   between the two ends, an estimate of what one host of a real two-machine setup carries.
//!   With `NET_VARIANTS` set, two attribution-only VXLAN paths follow (configurations nimbus
//!   never runs): bridge netfilter off on both hosts (no security groups), and traffic within
//!   the VPCs untracked and accepted (br_netfilter on, no conntrack). With `NET_HOLD` set, the
//!   cluster stays up after setup, with the paths' namespaces and addresses in
//!   `/tmp/net-hold.env`, until that file is removed (for profiling by hand).
//! - `bench_rule_propagation`: with `NET_RULES` (1000) rules in a group whose members run on
//!   all three hosts, the time from the API call adding a rule until every host's kernel has
//!   the rule's nftables element (`nft get element`, polled by one thread per host, so a figure
//!   includes up to one probe, ~10-40 ms here), `NET_RULE_TRIALS` (100) times; median and p99.
//!
//! Results are printed and, with `NET_BENCH_OUT=<file>`, appended as markdown.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nimbus_api::{AddRuleRequest, CreateInstanceRequest, InstanceState};
use nimbus_client::Client;
use nimbus_testkit::netns::{self, Net};
use nimbus_testkit::{eventually, have, require};

mod net_cpu;

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

/// One iperf3 transfer: throughput, bytes, and what it cost in CPU.
struct Run {
    gbps: f64,
    bytes: f64,
    cpu: net_cpu::Usage,
}

impl Run {
    fn gb(&self) -> f64 {
        self.bytes / 1e9
    }
}

/// iperf3 client (in group `g`) in namespace `client_ns` (an nsenter `--net=` argument)
/// against the server at `ip`, with the machine's CPU counters read right around it after a
/// background sample of `net_cpu::BACKGROUND`.
fn iperf(g: &net_cpu::Group, client_ns: &str, ip: &str, secs: u64) -> Run {
    let idle = net_cpu::snapshot(g);
    std::thread::sleep(net_cpu::BACKGROUND);
    let before = net_cpu::snapshot(g);
    let out = g
        .wrap(&[
            "nsenter",
            client_ns,
            "chrt",
            "-f",
            "50",
            "iperf3",
            "-A",
            "0",
            "-c",
            ip,
            "-J",
            "-t",
            &secs.to_string(),
        ])
        .output()
        .expect("iperf3");
    let after = net_cpu::snapshot(g);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 output: {e}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let got = &v["end"]["sum_received"];
    let (Some(bps), Some(bytes)) = (got["bits_per_second"].as_f64(), got["bytes"].as_f64()) else {
        panic!("no throughput in {v}")
    };
    Run {
        gbps: bps / 1e9,
        bytes,
        cpu: net_cpu::usage(&idle, &before, &after),
    }
}

/// The CPU the iperf3 servers run on: another than the clients' CPU 0 where there is one.
fn server_cpu() -> &'static str {
    if cpus() > 1 {
        "1"
    } else {
        "0"
    }
}

fn cpus() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
}

/// An iperf3 server, killed on drop (so that a failing benchmark leaves none behind).
struct Server(std::process::Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn iperf_server(g: &net_cpu::Group, ns: &str) -> Server {
    let child = g
        .wrap(&[
            "nsenter",
            ns,
            "chrt",
            "-f",
            "50",
            "iperf3",
            "-A",
            server_cpu(),
            "-s",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 -s");
    std::thread::sleep(Duration::from_millis(300));
    Server(child)
}

/// Sets the RPS CPU mask of `dev`'s receive queue in network namespace `ns` (`0` = off).
fn rps(ns: &str, dev: &str, mask: &str) {
    sh(&[
        "ip",
        "netns",
        "exec",
        ns,
        "sh",
        "-c",
        &format!("echo {mask} > /sys/class/net/{dev}/queues/rx-0/rps_cpus"),
    ]);
}

/// `NET_VARIANTS`: bridged IPv4 skips netfilter (the sysctl and every bridge's own flag).
const BRNF_OFF: &str = "sysctl -qw net.bridge.bridge-nf-call-iptables=0; \
    for f in /sys/class/net/*/bridge/nf_call_iptables; do [ -e $f ] && echo 0 > $f; done; true";
/// Undoes [`BRNF_OFF`] (what the agent configures).
const BRNF_ON: &str = "sysctl -qw net.bridge.bridge-nf-call-iptables=1; \
    for f in /sys/class/net/*/bridge/nf_call_iptables; do [ -e $f ] && echo 1 > $f; done; true";
/// `NET_VARIANTS`: traffic within the VPCs skips conntrack and the security-group chains.
const UNTRACK_ON: &str = "nft insert rule inet nimbus raw_pre ip saddr @vpc_cidrs ip daddr \
    @vpc_cidrs notrack comment netbench && nft insert rule inet nimbus filter_forward \
    ip saddr @vpc_cidrs ip daddr @vpc_cidrs accept comment netbench";
/// Undoes [`UNTRACK_ON`].
const UNTRACK_OFF: &str = "for c in raw_pre filter_forward; do nft -a list chain inet nimbus $c \
    | sed -n 's/.*comment \"netbench\" # handle //p' | while read h; do \
    nft delete rule inet nimbus $c handle $h; done; done";

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

/// One measured path: where the client runs, the server's address, and the RPS masks set
/// for its runs (namespace, device, CPU mask), cleared after each.
struct Route {
    name: &'static str,
    client: String,
    ip: String,
    steer: Vec<(String, &'static str, &'static str)>,
    /// Shell commands run in the two hosts' namespaces before (`.0`) and after (`.1`) every run.
    tweak: Option<(&'static str, &'static str)>,
    runs: Vec<Run>,
}

impl Route {
    fn med(&self, f: impl Fn(&Run) -> f64) -> f64 {
        median(self.runs.iter().map(f).collect())
    }
    fn gbps(&self) -> f64 {
        self.med(|r| r.gbps)
    }
    /// The path's CPU-seconds per GB (machine busy time minus other processes').
    fn cpu_gb(&self) -> f64 {
        self.med(|r| r.cpu.path() / r.gb())
    }
    /// CPU-seconds per GB of the benchmark's processes and ksoftirqd (a lower bound).
    fn procs_gb(&self) -> f64 {
        self.med(|r| r.cpu.attributed_total() / r.gb())
    }
    /// Raw machine busy CPU-seconds per GB (an upper bound).
    fn machine_gb(&self) -> f64 {
        self.med(|r| r.cpu.busy_total() / r.gb())
    }
    /// `f(run, cpu)` per CPU, medians joined by " / ", with `prec` decimals.
    fn per_cpu(&self, cpus: usize, prec: usize, f: impl Fn(&Run, usize) -> f64) -> String {
        (0..cpus)
            .map(|i| format!("{:.prec$}", self.med(|r| f(r, i))))
            .collect::<Vec<_>>()
            .join(" / ")
    }
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: scripts/bench-net"]
async fn bench_throughput() {
    let Some(net) = cluster().await else {
        return;
    };
    let secs = env_num("NET_SECS", 5);
    let trials = env_num("NET_TRIALS", 3);
    let load_start = net_cpu::loadavg();
    let started = std::time::SystemTime::now();
    let c = net.client(0);
    let server = launch(&c, "srv", 0, &[]).await;
    let same = launch(&c, "same", 0, &[]).await;
    let remote = launch(&c, "remote", 1, &[]).await;
    let sip = server.status.ip.clone().unwrap();
    let group = net_cpu::Group::new(&format!("nimbus-netbench-{}", net.slot()));
    let srv = iperf_server(&group, &netns_of(&net, 0, &server));
    let pair = VethPair::new(&net.slot().to_string());
    let base_srv = iperf_server(&group, &format!("--net=/run/netns/{}", pair.1));
    let base_ns = format!("--net=/run/netns/{}", pair.0);
    let cpus = cpus();
    let path = |name, client: String, ip: &str, steer| Route {
        name,
        client,
        ip: ip.to_owned(),
        steer,
        tweak: None,
        runs: Vec::new(),
    };
    let (h0, h1) = (net.hosts[0].ns.clone(), net.hosts[1].ns.clone());
    let mut paths = vec![
        path(
            "plain veth pair between two namespaces (baseline)",
            base_ns.clone(),
            "10.77.0.2",
            vec![],
        ),
        path(
            "container to container, same host (bridge)",
            netns_of(&net, 0, &same),
            &sip,
            vec![],
        ),
        path(
            "container to container, two hosts (VXLAN)",
            netns_of(&net, 1, &remote),
            &sip,
            vec![],
        ),
    ];
    if cpus > 1 {
        // Receive processing steered (RPS) to the receiver's CPU: the server's side (its
        // namespace's device facing the sender) to CPU 1, the client's side (where the ACKs
        // arrive) to CPU 0, so that each CPU does one end's work, as one host would.
        paths.push(path(
            "plain veth pair, receive steered to the receiver's CPU",
            base_ns.clone(),
            "10.77.0.2",
            vec![(pair.1.clone(), "nbvy", "2"), (pair.0.clone(), "nbvx", "1")],
        ));
        paths.push(path(
            "two hosts (VXLAN), each host's underlay receive steered to its own CPU",
            netns_of(&net, 1, &remote),
            &sip,
            vec![(h0, "eth0", "2"), (h1, "eth0", "1")],
        ));
    }
    if std::env::var_os("NET_HOLD").is_some() {
        // Manual inspection: the paths' namespaces and addresses, kept until the file is removed.
        let hold = "/tmp/net-hold.env";
        let mut text = String::new();
        for (i, p) in paths.iter().enumerate() {
            let _ = writeln!(text, "P{i}_NS={} P{i}_IP={}", p.client, p.ip);
        }
        std::fs::write(hold, text).expect("hold file");
        while Path::new(hold).exists() {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    if std::env::var_os("NET_VARIANTS").is_some() {
        // Attribution only (not configurations nimbus runs): the VXLAN path with the bridges'
        // netfilter off on both hosts (no security groups at all), and with the instances'
        // flows untracked and accepted (br_netfilter still on, no conntrack).
        let vx = |name, tweak| Route {
            tweak: Some(tweak),
            ..path(name, netns_of(&net, 1, &remote), &sip, vec![])
        };
        paths.push(vx(
            "two hosts (VXLAN), bridge netfilter off on both hosts (attribution only)",
            (BRNF_OFF, BRNF_ON),
        ));
        paths.push(vx(
            "two hosts (VXLAN), instance flows untracked on both hosts (attribution only)",
            (UNTRACK_ON, UNTRACK_OFF),
        ));
    }
    for _ in 0..trials {
        // Interleaved, so drift of the shared machine hits all paths alike.
        for p in &mut paths {
            for (ns, dev, mask) in &p.steer {
                rps(ns, dev, mask);
            }
            if let Some((on, _)) = p.tweak {
                net.hosts[..2]
                    .iter()
                    .for_each(|h| sh(&["ip", "netns", "exec", &h.ns, "sh", "-c", on]));
            }
            p.runs.push(iperf(&group, &p.client, &p.ip, secs));
            for (ns, dev, _) in &p.steer {
                rps(ns, dev, "0");
            }
            if let Some((_, off)) = p.tweak {
                net.hosts[..2]
                    .iter()
                    .for_each(|h| sh(&["ip", "netns", "exec", &h.ns, "sh", "-c", off]));
            }
        }
    }
    drop((srv, base_srv));
    let load_end = net_cpu::loadavg();
    let when = started
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (base_gbps, base_cpu) = (paths[0].gbps(), paths[0].cpu_gb());
    let cpu_names = (0..cpus)
        .map(|i| format!("CPU {i}"))
        .collect::<Vec<_>>()
        .join(" / ");
    let mut table = format!(
        "Started at unix time {when}; 1-minute load average {load_start} at the start, {load_end} at the end; \
         {cpus} CPUs; {trials} x {secs} s iperf3 per path, interleaved; medians. CPU-s/GB: CPU-seconds per GB \
         (10^9 bytes received). Path: /proc/stat busy time of all CPUs minus every other process's CPU time in \
         the same window; processes: the iperf3s' cgroup plus ksoftirqd (lower bound: misses softirq run in \
         the idle task); machine: raw /proc/stat busy time (upper bound: everyone's work).\n\n\
         | path | Gbit/s | ratio to veth | CPU-s/GB, path | ratio to veth | CPU-s/GB, processes | CPU-s/GB, machine |\n\
         |---|---|---|---|---|---|---|\n"
    );
    for p in &paths {
        let _ = writeln!(
            table,
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |",
            p.name,
            p.gbps(),
            p.gbps() / base_gbps,
            p.cpu_gb(),
            p.cpu_gb() / base_cpu,
            p.procs_gb(),
            p.machine_gb(),
        );
    }
    report(&table);
    let mut table = format!(
        "| per CPU ({cpu_names}), median | busy % (all processes) | processes % | softirq % | steal % | \
         CPU-s/GB, machine | CPU-s/GB, processes | background before, % of {cpus} CPUs |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    for p in &paths {
        let _ = writeln!(
            table,
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} |",
            p.name,
            p.per_cpu(cpus, 0, |r, i| 100.0 * r.cpu.busy[i] / r.cpu.wall),
            p.per_cpu(cpus, 0, |r, i| 100.0 * r.cpu.attributed[i] / r.cpu.wall),
            p.per_cpu(cpus, 0, |r, i| 100.0 * r.cpu.softirq[i] / r.cpu.wall),
            p.per_cpu(cpus, 0, |r, i| 100.0 * r.cpu.steal[i] / r.cpu.wall),
            p.per_cpu(cpus, 2, |r, i| r.cpu.busy[i] / r.gb()),
            p.per_cpu(cpus, 2, |r, i| r.cpu.attributed[i] / r.gb()),
            p.med(|r| 100.0 * r.cpu.background / cpus as f64),
        );
    }
    report(&table);
    let rounds: Vec<String> = (0..paths[0].runs.len())
        .map(|k| {
            let (b, v, r) = (&paths[0].runs[k], &paths[2].runs[k], &paths[1].runs[k]);
            let per_gb = |x: &Run| x.cpu.path() / x.gb();
            format!(
                "{:.2}/{:.2} ({:.2})",
                v.gbps / b.gbps,
                r.gbps / b.gbps,
                per_gb(v) / per_gb(b)
            )
        })
        .collect();
    report(&format!(
        "Per round, throughput VXLAN/veth and bridge/veth (path CPU-s/GB VXLAN/veth): {}\n",
        rounds.join(", ")
    ));
    if !group.per_cpu() {
        report("(cgroup v2: the processes' time is not known per CPU; all of it shows on CPU 0)\n");
    }
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
