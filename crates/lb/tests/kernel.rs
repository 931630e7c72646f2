//! The in-kernel L4 path: real nftables DNAT in this network namespace (needs root and `nft`).
//!
//! A connection the kernel forwards reaches the backend from the client's own address and port
//! (loopback clients are not masqueraded), while one relayed in user space comes from the
//! proxy's socket; the backends below report the peer they see, which tells the two apart.
#![allow(missing_docs)]

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use common::{listener, start_lb, udp_echo};
use nimbus_lb::{Algorithm, HealthCheckConfig, HealthProbe, LbConfig, LoadBalancer, Protocol};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};

/// Whether `nft` runs here; in CI its absence fails the test instead of skipping it.
fn nft_available() -> bool {
    let ok = std::process::Command::new("nft")
        .args(["list", "tables"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || std::env::var("CI").as_deref() != Ok("true"),
        "nft is required (root and the nftables package)"
    );
    if !ok {
        eprintln!("skipping: nft unavailable");
    }
    ok
}

/// A TCP backend that first writes `<name> <peer>\n`, then echoes.
async fn who_backend(name: &'static str) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let t = tokio::spawn(async move {
        loop {
            let Ok((mut s, peer)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if s.write_all(format!("{name} {peer}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    (addr, t)
}

/// Write `text` on an open flow and read its echo.
async fn echo_line(held: &mut BufReader<TcpStream>, text: &str) -> String {
    held.get_mut().write_all(text.as_bytes()).await.unwrap();
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), held.read_line(&mut line))
        .await
        .expect("flow stalled")
        .unwrap();
    line
}

/// Connect and read the greeting: (backend name, whether the backend saw this very socket,
/// i.e. the kernel forwarded it), keeping the stream open.
async fn hello(addr: SocketAddr) -> (String, bool, BufReader<TcpStream>) {
    hello_from(addr, Ipv4Addr::LOCALHOST).await
}

/// [`hello`] from a socket bound to `src` (any 127/8 address is this host's).
async fn hello_from(addr: SocketAddr, src: Ipv4Addr) -> (String, bool, BufReader<TcpStream>) {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind(SocketAddr::from((src, 0))).unwrap();
    let s = sock.connect(addr).await.unwrap();
    let local = s.local_addr().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
        .await
        .expect("greeting timed out")
        .unwrap();
    let (name, peer) = line.trim().split_once(' ').expect("greeting");
    (name.to_string(), peer == local.to_string(), r)
}

/// A flow to `addr` that the kernel forwarded to backend `b0`. A proxy's table can exist before
/// its backend is in it (the first plan may be rendered before the backend's first health probe
/// passed; a restarted proxy replaces the table the same way): retried for up to 10 s.
async fn hello_via_kernel(addr: SocketAddr) -> BufReader<TcpStream> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (name, kernel, held) = hello(addr).await;
        assert_eq!(name, "b0");
        if kernel {
            return held;
        }
        assert!(
            Instant::now() < deadline,
            "no flow forwarded in the kernel within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn kernel_cfg(name: &str, protocol: Protocol, backends: Vec<SocketAddr>) -> LbConfig {
    let mut cfg = LbConfig::simple(name, listener(protocol), backends);
    cfg.kernel_l4 = Some(format!("lbk{}", std::process::id()));
    cfg
}

fn table_exists(table: &str) -> bool {
    std::process::Command::new("nft")
        .args(["list", "table", "ip", table])
        .output()
        .is_ok_and(|o| o.status.success())
}

async fn until<F: FnMut() -> bool>(what: &str, mut f: F) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An LB's table name; deletes the table when dropped, so a test that fails before its
/// shutdown leaves no DNAT rules behind (after a clean shutdown it is already gone).
struct Table(String);

impl std::ops::Deref for Table {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl Drop for Table {
    fn drop(&mut self) {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "ip", &self.0])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

async fn wait_table(lb: &LoadBalancer) -> Table {
    let table = Table(lb.kernel_table().expect("kernel path enabled").to_string());
    until("the L4 table", || table_exists(&table)).await;
    table
}

fn metric(text: &str, line_prefix: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_prefix))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn tcp_weighted_in_kernel_counts_and_keeps_flows_across_updates() {
    if !nft_available() {
        return;
    }
    let (b0, _t0) = who_backend("b0").await;
    let (b1, _t1) = who_backend("b1").await;
    let mut cfg = kernel_cfg("kweighted", Protocol::Tcp, vec![b0, b1]);
    cfg.pools[0].algorithm = Algorithm::Weighted;
    cfg.pools[0].backends[0].weight = 3;
    let (lb, metrics) = start_lb(cfg.clone()).await;
    let addr = lb.addr(Protocol::Tcp).unwrap();
    let table = wait_table(&lb).await;

    let mut seen: HashMap<String, u32> = HashMap::new();
    for _ in 0..40 {
        let (name, kernel, _s) = hello(addr).await;
        assert!(
            kernel,
            "connection was relayed in user space, not forwarded"
        );
        *seen.entry(name).or_default() += 1;
    }
    assert_eq!(seen.get("b0"), Some(&30), "{seen:?}");
    assert_eq!(seen.get("b1"), Some(&10), "{seen:?}");

    // A flow open across a configuration change keeps its backend; new ones follow the change.
    let (first, _, mut held) = hello(addr).await;
    let keep = if first == "b0" { b0 } else { b1 };
    cfg.pools[0].backends.retain(|b| b.addr != keep);
    lb.update(cfg).await.unwrap();
    let other = if first == "b0" { "b1" } else { "b0" };
    until("the update in the kernel", || {
        std::process::Command::new("nft")
            .args(["list", "chain", "ip", &table, "pick"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).matches("jump b").count() == 1)
    })
    .await;
    for _ in 0..4 {
        let (name, kernel, _s) = hello(addr).await;
        assert_eq!((name.as_str(), kernel), (other, true));
    }
    held.get_mut().write_all(b"still here\n").await.unwrap();
    let mut echo = String::new();
    tokio::time::timeout(Duration::from_secs(5), held.read_line(&mut echo))
        .await
        .expect("held flow broken by the update")
        .unwrap();
    assert_eq!(echo, "still here\n");

    // Counters reach the metrics: 30 connections to b0 or more, bytes both ways, one open flow.
    let mut text = String::new();
    until("kernel counters in the metrics", || {
        text = metrics.encode();
        metric(
            &text,
            "nimbus_lb_requests_total{lb=\"kweighted\",backend=\"b1\",class=\"2xx\"} ",
        ) >= 10
            && metric(
                &text,
                "nimbus_lb_bytes_total{lb=\"kweighted\",backend=\"b0\",direction=\"from_backend\"} ",
            ) > 0
    })
    .await;
    assert!(
        metric(
            &text,
            "nimbus_lb_requests_total{lb=\"kweighted\",backend=\"b0\",class=\"2xx\"} "
        ) >= 30,
        "{text}"
    );
    drop(held);

    lb.shutdown();
    until("the table removed at shutdown", || !table_exists(&table)).await;
}

#[tokio::test]
async fn kernel_path_follows_health_checks() {
    if !nft_available() {
        return;
    }
    let mut cfg = kernel_cfg("khealth", Protocol::Tcp, Vec::new());
    cfg.health_check = Some(HealthCheckConfig {
        probe: HealthProbe::Tcp,
        interval_ms: 100,
        timeout_ms: 200,
        healthy_threshold: 1,
        unhealthy_threshold: 1,
    });
    dead_backend_leaves_rotation(cfg, Duration::from_secs(5)).await;
}

/// A backend added to a kernel-forwarded listener takes connections as soon as its first probe
/// (run at once) passed, although the interval is 10 s and 3 passes are configured; one
/// removed takes no new connection once `update` returned (it waits for the table).
#[tokio::test]
async fn kernel_path_admits_on_the_first_probe_and_update_waits_for_the_table() {
    if !nft_available() {
        return;
    }
    let (b0, _t0) = who_backend("b0").await;
    let (b1, _t1) = who_backend("b1").await;
    let mut cfg = kernel_cfg("kadmit", Protocol::Tcp, vec![b0]);
    cfg.health_check = Some(HealthCheckConfig {
        probe: HealthProbe::Tcp,
        interval_ms: 10_000,
        timeout_ms: 500,
        healthy_threshold: 3,
        unhealthy_threshold: 3,
    });
    let (lb, _) = start_lb(cfg.clone()).await;
    let addr = lb.addr(Protocol::Tcp).unwrap();
    let table = wait_table(&lb).await;
    // `start` returned with the table in place: forwarded by the kernel from the first connection.
    let (name, kernel, _s) = hello(addr).await;
    assert_eq!((name.as_str(), kernel), ("b0", true));

    let mut both = cfg.clone();
    both.pools = LbConfig::simple("x", listener(Protocol::Tcp), vec![b0, b1]).pools;
    lb.update(both).await.unwrap();
    let added = Instant::now();
    loop {
        let (name, kernel, _s) = hello(addr).await;
        if name == "b1" {
            assert!(kernel, "b1 reached in user space");
            break;
        }
        assert!(added.elapsed() < Duration::from_secs(3), "b1 never picked");
    }
    let took = added.elapsed();
    assert!(
        took < Duration::from_millis(300),
        "b1 forwarded after {took:?}"
    );

    let mut only_b1 = cfg;
    only_b1.pools = LbConfig::simple("x", listener(Protocol::Tcp), vec![b1]).pools;
    only_b1.pools[0].backends[0].name = "b1".into();
    lb.update(only_b1).await.unwrap();
    for _ in 0..10 {
        let (name, kernel, _s) = hello(addr).await;
        assert_eq!((name.as_str(), kernel), ("b1", true));
    }
    lb.shutdown();
    until("the table removed", || !table_exists(&table)).await;
}

/// Without a configured health check, a kernel-forwarded TCP listener gets an implicit one
/// (default: every 2 s, 3 failures), since the kernel reports no failed connects for passive
/// ejection: a dead backend must still leave the rotation.
#[tokio::test]
async fn kernel_path_without_health_check_still_drops_a_dead_backend() {
    if !nft_available() {
        return;
    }
    let cfg = kernel_cfg("kimplicit", Protocol::Tcp, Vec::new());
    dead_backend_leaves_rotation(cfg, Duration::from_secs(12)).await;
}

/// Two backends b0 and b1 in `cfg`; b1 dies; new connections must all reach b0 within `within`.
async fn dead_backend_leaves_rotation(mut cfg: LbConfig, within: Duration) {
    let (b0, _t0) = who_backend("b0").await;
    let (b1, t1) = who_backend("b1").await;
    cfg.pools = LbConfig::simple("x", listener(Protocol::Tcp), vec![b0, b1]).pools;
    let (lb, _) = start_lb(cfg).await;
    let addr = lb.addr(Protocol::Tcp).unwrap();
    let table = wait_table(&lb).await;
    let mut names = Vec::new();
    for _ in 0..4 {
        names.push(hello(addr).await.0);
    }
    assert!(names.iter().any(|n| n == "b1"), "{names:?}");
    t1.abort();
    let down = Instant::now();
    loop {
        assert!(down.elapsed() < within, "b1 still picked");
        let mut all_b0 = true;
        for _ in 0..4 {
            // A connection to the dead backend is refused; that counts as "still picked".
            match tokio::time::timeout(Duration::from_secs(2), async {
                let s = TcpStream::connect(addr).await.ok()?;
                let mut r = BufReader::new(s);
                let mut l = String::new();
                r.read_line(&mut l).await.ok()?;
                Some(l)
            })
            .await
            {
                Ok(Some(l)) if l.starts_with("b0 ") => {}
                _ => all_b0 = false,
            }
        }
        if all_b0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (name, kernel, _s) = hello(addr).await;
    assert_eq!((name.as_str(), kernel), ("b0", true));
    lb.shutdown();
    until("the table removed", || !table_exists(&table)).await;
}

#[tokio::test]
async fn udp_in_kernel() {
    if !nft_available() {
        return;
    }
    let (e0, _t0) = udp_echo("u0:").await;
    let (e1, _t1) = udp_echo("u1:").await;
    let (lb, metrics) = start_lb(kernel_cfg("kudp", Protocol::Udp, vec![e0, e1])).await;
    let addr = lb.addr(Protocol::Udp).unwrap();
    let table = wait_table(&lb).await;
    let mut tags = Vec::new();
    for i in 0..4 {
        let c = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        c.connect(addr).await.unwrap();
        c.send(format!("ping{i}").as_bytes()).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(3), c.recv(&mut buf))
            .await
            .expect("no UDP reply")
            .unwrap();
        let reply = String::from_utf8_lossy(&buf[..n]).to_string();
        assert!(reply.ends_with(&format!("ping{i}")), "{reply}");
        tags.push(reply[..3].to_string());
    }
    assert_eq!(tags, ["u0:", "u1:", "u0:", "u1:"]);
    until("UDP flows counted", || {
        let t = metrics.encode();
        metric(
            &t,
            "nimbus_lb_requests_total{lb=\"kudp\",backend=\"b0\",class=\"2xx\"} ",
        ) == 2
    })
    .await;
    lb.shutdown();
    until("the table removed", || !table_exists(&table)).await;
}

/// Each of 12 client addresses' connections (3 each) all reach one backend, in the kernel.
async fn owners(addr: SocketAddr) -> Vec<String> {
    let mut owners = Vec::new();
    for k in 2..14 {
        let src = Ipv4Addr::new(127, 0, 0, k);
        let mut names = Vec::new();
        for _ in 0..3 {
            let (name, kernel, _s) = hello_from(addr, src).await;
            assert!(kernel, "{src}: relayed in user space, not forwarded");
            names.push(name);
        }
        assert!(names.iter().all(|n| *n == names[0]), "{src}: {names:?}");
        owners.push(names.swap_remove(0));
    }
    owners
}

#[tokio::test]
async fn client_address_hashing_in_kernel_is_sticky_and_consistent() {
    if !nft_available() {
        return;
    }
    for (name, alg) in [
        ("kiphash", Algorithm::IpHash),
        ("kconsistent", Algorithm::ConsistentHash),
    ] {
        let (b0, _t0) = who_backend("b0").await;
        let (b1, _t1) = who_backend("b1").await;
        let (b2, _t2) = who_backend("b2").await;
        let mut cfg = kernel_cfg(name, Protocol::Tcp, vec![b0, b1, b2]);
        cfg.pools[0].algorithm = alg;
        let (lb, _) = start_lb(cfg.clone()).await;
        let addr = lb.addr(Protocol::Tcp).unwrap();
        let table = wait_table(&lb).await;
        let before = owners(addr).await;
        let mut used = before.clone();
        used.sort();
        used.dedup();
        assert!(
            used.len() >= 2,
            "{alg:?}: 12 clients on one backend: {before:?}"
        );

        // The first client's backend leaves: its clients move, every other client stays.
        let gone = before[0].clone();
        let gone_addr = [b0, b1, b2][usize::from(gone.as_bytes()[1] - b'0')];
        cfg.pools[0].backends.retain(|b| b.addr != gone_addr);
        lb.update(cfg).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while hello_from(addr, Ipv4Addr::new(127, 0, 0, 2)).await.0 == gone {
            assert!(Instant::now() < deadline, "{alg:?}: update not applied");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let after = owners(addr).await;
        for (b, a) in before.iter().zip(&after) {
            if *b == gone {
                assert_ne!(a, &gone, "{alg:?}: {before:?} -> {after:?}");
            } else {
                assert_eq!(a, b, "{alg:?}: a client moved: {before:?} -> {after:?}");
            }
        }
        lb.shutdown();
        until("the table removed", || !table_exists(&table)).await;
    }
}

#[tokio::test]
async fn ineligible_algorithm_stays_in_user_space() {
    if !nft_available() {
        return;
    }
    let (b0, _t0) = who_backend("b0").await;
    let mut cfg = kernel_cfg("kleast", Protocol::Tcp, vec![b0]);
    cfg.pools[0].algorithm = Algorithm::LeastConnections;
    let (lb, _) = start_lb(cfg).await;
    let addr = lb.addr(Protocol::Tcp).unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let table = lb.kernel_table().unwrap().to_string();
    assert!(!table_exists(&table));
    let (name, kernel, _s) = hello(addr).await;
    assert_eq!((name.as_str(), kernel), ("b0", false));
    lb.shutdown();
}

#[tokio::test]
async fn stale_tables_are_removed_and_others_kept() {
    if !nft_available() {
        return;
    }
    let prefix = format!("lbs{}", std::process::id());
    let stale = format!("{prefix}_lb0123abcd");
    let kept = format!("{prefix}_lbfedc3210");
    let foreign = format!("{prefix}_lbx");
    for t in [&stale, &kept, &foreign] {
        assert!(std::process::Command::new("nft")
            .args(["add", "table", "ip", t])
            .status()
            .unwrap()
            .success());
    }
    let removed =
        nimbus_lb::kernel_sync::remove_stale_tables(&prefix, std::slice::from_ref(&kept)).await;
    assert_eq!(removed, vec![stale.clone()]);
    assert!(!table_exists(&stale));
    assert!(table_exists(&kept) && table_exists(&foreign));
    for t in [&kept, &foreign] {
        let _ = std::process::Command::new("nft")
            .args(["delete", "table", "ip", t])
            .status();
    }
}

/// A backend removed from the config keeps its forwarded flows for the drain timeout, then
/// they end (their conntrack entries are deleted; the next packet is answered with a reset).
#[tokio::test]
async fn removed_backend_flows_are_cut_after_the_drain_timeout() {
    if !nft_available() {
        return;
    }
    let (b0, _t0) = who_backend("b0").await;
    let (b1, _t1) = who_backend("b1").await;
    let mut cfg = kernel_cfg("kdrain", Protocol::Tcp, vec![b0, b1]);
    cfg.limits.drain_timeout_ms = 1_000;
    let (lb, _) = start_lb(cfg.clone()).await;
    let addr = lb.addr(Protocol::Tcp).unwrap();
    let table = wait_table(&lb).await;
    let mut held = None;
    for _ in 0..4 {
        let (name, kernel, s) = hello(addr).await;
        assert!(kernel);
        if name == "b1" {
            held = Some(s);
            break;
        }
    }
    let mut held = held.expect("round robin never picked b1");
    cfg.pools[0].backends.retain(|b| b.addr != b1);
    lb.update(cfg).await.unwrap();
    let removed = Instant::now();
    // Within the drain timeout the flow still works.
    held.get_mut().write_all(b"one\n").await.unwrap();
    let mut line = String::new();
    held.read_line(&mut line).await.unwrap();
    assert_eq!(line, "one\n");
    assert!(
        removed.elapsed() < Duration::from_millis(800),
        "too slow to test"
    );
    tokio::time::sleep(Duration::from_millis(2_000)).await;
    // After it, the flow is gone: the write or the read fails, or the read sees the end.
    let ended = async {
        if held.get_mut().write_all(b"two\n").await.is_err() {
            return true;
        }
        let mut line = String::new();
        matches!(held.read_line(&mut line).await, Err(_) | Ok(0))
    };
    assert!(
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .unwrap_or(false),
        "the drained flow still works after the drain timeout"
    );
    lb.shutdown();
    until("the table removed", || !table_exists(&table)).await;
}

/// A child process killed (and reaped) when dropped, also when a test panics.
struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The kernel keeps forwarding established flows when the process that programmed it dies
/// (`kill -9`), and a restarted process with the same config takes the table over without
/// breaking them.
#[tokio::test]
async fn forwarded_flows_survive_kill_9_and_restart_of_the_proxy() {
    if !nft_available() {
        return;
    }
    let (b0, _t0) = who_backend("b0").await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cfg = kernel_cfg(
        &format!("kproc{}", std::process::id()),
        Protocol::Tcp,
        vec![b0],
    );
    cfg.listeners[0].port = port;
    // Its own prefix: the other tests' tables must not count here.
    cfg.kernel_l4 = Some(format!("lbp{}", std::process::id()));
    let dir = std::env::temp_dir().join(format!("nimbus-lb-kproc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.json");
    std::fs::write(&path, serde_json::to_vec(&cfg).unwrap()).unwrap();
    let table = format!("lbp{}_lb", std::process::id());
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_nimbus-lb-proxy"))
            .arg(&path)
            .args(["--workers", "1"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .map(Proc)
            .unwrap()
    };
    let tables = || {
        let o = std::process::Command::new("nft")
            .args(["list", "tables", "ip"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
            .filter(|t| t.starts_with(&table))
            .collect::<Vec<_>>()
    };
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut proxy = spawn();
    until("the proxy's table", || tables().len() == 1).await;
    let mut held = hello_via_kernel(addr).await;

    proxy.0.kill().unwrap(); // SIGKILL: no cleanup runs
    proxy.0.wait().unwrap();
    assert_eq!(echo_line(&mut held, "after kill\n").await, "after kill\n");
    assert_eq!(tables().len(), 1, "the table outlives the process");

    let mut proxy = spawn();
    until("the restarted proxy listening", || {
        std::net::TcpStream::connect(addr).is_ok()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await; // at least one sync: table replaced
    assert_eq!(
        echo_line(&mut held, "after restart\n").await,
        "after restart\n"
    );
    let _s = hello_via_kernel(addr).await;

    // SIGTERM: the proxy stops and removes its table.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(proxy.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    proxy.0.wait().unwrap();
    assert!(
        tables().is_empty(),
        "table left after SIGTERM: {:?}",
        tables()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
