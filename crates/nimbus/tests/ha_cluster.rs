//! High availability of the control plane: three `nimbus server`s, each in its own network
//! namespace (`testkit::netns`), under faults, while a client writes and reads through any
//! server; afterwards the history checker (`testkit::history`) verifies that no acknowledged
//! write was lost and no read was stale or saw a value that was later lost.

use std::path::Path;
use std::time::{Duration, Instant};

use nimbus_client::Client;
use nimbus_testkit::history::{self, Workload};
use nimbus_testkit::netns::{self, Net};
use nimbus_testkit::{require, Cloud};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

/// Three servers formed with `--bootstrap-expect 3`, or `None` (local run without root).
async fn cluster() -> Option<Net> {
    if !require("root, ip, tc and nft (netns harness)", netns::available()) {
        return None;
    }
    let mut net = Net::new(bin(), 3).expect("netns hosts");
    net.start_servers(&[]).expect("start servers");
    net.wait_cluster(&[0, 1, 2], 3, Duration::from_secs(60))
        .await
        .expect("cluster formed");
    Some(net)
}

fn start_workload(net: &Net, prefix: &str) -> Workload {
    Workload::start(net, &[0, 1, 2], prefix)
}

/// Stops the workload, waits until the cluster is whole again and checks the history.
async fn finish(net: &Net, w: Workload) -> history::Summary {
    w.finish(net).await
}

async fn leader(net: &Net) -> usize {
    net.wait_cluster(&[0, 1, 2], 3, Duration::from_secs(30))
        .await
        .expect("leader")
}

/// Waits until a write through any server but `not` is acknowledged; returns how long it
/// took. Every attempt writes a fresh key: an attempt that timed out may still commit, so
/// retrying the same key could only ever answer "already exists".
async fn first_write(net: &Net, not: usize, key: &str, since: Instant) -> Duration {
    let mut n = 0u32;
    let mut last = String::new();
    loop {
        for i in (0..net.hosts.len()).filter(|&i| i != not) {
            n += 1;
            let c = net.client(i).with_timeout(Duration::from_secs(2));
            match c.create_project(&format!("{key}-{n}")).await {
                Ok(_) => return since.elapsed(),
                Err(e) => last = format!("host {i}: {e}"),
            }
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "no write succeeded within 30 s (last error: {last})\n{}",
            net.logs_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_kill9_leader() {
    let Some(mut net) = cluster().await else {
        return;
    };
    let w = start_workload(&net, "kl");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let l = leader(&net).await;
    let t = Instant::now();
    net.kill9(l);
    let took = first_write(&net, l, "after-kill", t).await;
    eprintln!("first write after kill -9 of the leader: {took:?}");
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    net.start_server(l).expect("restart");
    tokio::time::sleep(Duration::from_secs(2)).await;
    finish(&net, w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_partition_leader() {
    let Some(net) = cluster().await else {
        return;
    };
    let w = start_workload(&net, "pl");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let l = leader(&net).await;
    net.partition(l).expect("partition");
    let others: Vec<usize> = (0..3).filter(|&i| i != l).collect();
    let new = net
        .wait_cluster(&others, 3, Duration::from_secs(30))
        .await
        .expect("new leader among the majority");
    assert_ne!(new, l);
    // The isolated old leader must not acknowledge writes nor serve linearizable reads.
    let old = net.client(l).with_timeout(Duration::from_secs(15));
    assert!(
        old.create_project("on-isolated-leader").await.is_err(),
        "the isolated old leader acknowledged a write"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    net.heal(l).expect("heal");
    tokio::time::sleep(Duration::from_secs(3)).await;
    finish(&net, w).await;
    let c = net.client(l);
    let all = c.list_projects().await.expect("list");
    assert!(
        !all.iter().any(|p| p.meta.name == "on-isolated-leader"),
        "a write refused by the isolated leader appeared later"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_restart_all_servers_at_once() {
    let Some(mut net) = cluster().await else {
        return;
    };
    let w = start_workload(&net, "ra");
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..3 {
        net.kill9(i);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..3 {
        net.start_server(i).expect("restart");
    }
    leader(&net).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    finish(&net, w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_netem_loss_and_delay_on_leader_link() {
    let Some(net) = cluster().await else {
        return;
    };
    let w = start_workload(&net, "ne");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let l = leader(&net).await;
    let how = net.impair(l, 10, 40, "2mbit").expect("impair");
    eprintln!("leader link impaired with {how}");
    tokio::time::sleep(Duration::from_secs(8)).await;
    net.clear_impair(l);
    tokio::time::sleep(Duration::from_secs(2)).await;
    finish(&net, w).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_rolling_restart_under_load() {
    let Some(mut net) = cluster().await else {
        return;
    };
    let w = start_workload(&net, "rr");
    tokio::time::sleep(Duration::from_secs(1)).await;
    for i in 0..3 {
        net.restart(i).expect("restart");
        net.wait_cluster(&[0, 1, 2], 3, Duration::from_secs(30))
            .await
            .expect("cluster back");
        // Let the restarted server catch up before the next one goes.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let s = finish(&net, w).await;
    assert_eq!(s.unknown, 0, "a write was never acknowledged: {s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_membership_join_remove_and_cluster_id() {
    if !require("root, ip, tc and nft (netns harness)", netns::available()) {
        return;
    }
    let mut net = Net::new(bin(), 5).expect("netns hosts");
    // Three servers expecting each other; only one up at first: it says what it waits for.
    let peers: Vec<String> = net.urls().into_iter().take(3).collect();
    let peers = peers.join(",");
    net.start_servers_with(0, &["--bootstrap-expect", "3", "--peers", &peers])
        .expect("start 0");
    let waited = nimbus_testkit::eventually(Duration::from_secs(20), || async {
        net.log(0)
            .contains("waiting for 2 more servers (bootstrap-expect 3)")
            .then_some(())
    })
    .await;
    assert!(waited.is_some(), "no waiting message:\n{}", net.log(0));
    for i in 1..3 {
        net.start_servers_with(i, &["--bootstrap-expect", "3", "--peers", &peers])
            .expect("start");
    }
    net.wait_cluster(&[0, 1, 2], 3, Duration::from_secs(60))
        .await
        .expect("cluster");
    // Each server says when the cluster it bootstrapped has all three voters and a leader.
    for i in 0..3 {
        let ready = nimbus_testkit::eventually(Duration::from_secs(20), || async {
            net.log(i).contains("cluster ready: 3 voters").then_some(())
        })
        .await;
        assert!(ready.is_some(), "no ready message:\n{}", net.log(i));
    }
    let ids: Vec<Option<String>> = futures_ids(&net, &[0, 1, 2]).await;
    assert!(ids.iter().all(|i| i.is_some() && *i == ids[0]), "{ids:?}");

    // A fourth server joins through a follower; the CLI lists it.
    let join = net.hosts[1].url();
    net.start_servers_with(3, &["--join", &join])
        .expect("start 3");
    net.wait_cluster(&[0, 1, 2, 3], 4, Duration::from_secs(60))
        .await
        .expect("4 voters");
    assert_eq!(
        futures_ids(&net, &[3]).await[0],
        ids[0],
        "joined server's cluster id"
    );
    let out = std::process::Command::new(bin())
        .args(["server", "list"])
        .env("NIMBUS_URL", net.hosts[3].url())
        .env("NIMBUS_TOKEN", &net.admin_token)
        .output()
        .expect("cli");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("voter").count(), 4, "{text}");
    assert!(
        text.contains(ids[0].as_deref().unwrap_or_default()),
        "{text}"
    );

    // Removing it through the CLI (by URL) leaves three.
    let out = std::process::Command::new(bin())
        .args(["server", "remove", &net.hosts[3].url()])
        .env("NIMBUS_URL", net.hosts[0].url())
        .env("NIMBUS_TOKEN", &net.admin_token)
        .output()
        .expect("cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    net.wait_cluster(&[0, 1, 2], 3, Duration::from_secs(30))
        .await
        .expect("3 voters");

    // A server of another cluster (its own single-server cluster) is refused.
    net.start_servers_with(4, &["--bootstrap-expect", "1"])
        .expect("start 4");
    let other = nimbus_testkit::eventually(Duration::from_secs(30), || async {
        net.client(4)
            .cluster_info()
            .await
            .ok()
            .and_then(|i| i.cluster_id)
    })
    .await
    .expect("other cluster id");
    assert_ne!(Some(other), ids[0]);
    let err = net
        .client(0)
        .cluster_add_server(&net.hosts[4].url())
        .await
        .expect_err("joining a server of another cluster must fail");
    assert!(err.to_string().contains("belongs to cluster"), "{err}");
    let info = net.client(0).cluster_info().await.expect("info");
    assert_eq!(info.members.len(), 3, "{info:?}");
}

async fn futures_ids(net: &Net, hosts: &[usize]) -> Vec<Option<String>> {
    let mut out = Vec::new();
    for &i in hosts {
        let id = nimbus_testkit::eventually(Duration::from_secs(20), || async {
            net.client(i)
                .cluster_info()
                .await
                .ok()
                .and_then(|c| c.cluster_id)
        })
        .await;
        out.push(id);
    }
    out
}

/// A server without the cluster secret cannot join, not even with the node token every agent
/// holds: the members refuse it at once and the membership is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_a_server_without_the_cluster_secret_cannot_join() {
    if !require("root, ip, tc and nft (netns harness)", netns::available()) {
        return;
    }
    let mut net = Net::new(bin(), 2).expect("netns hosts");
    net.start_servers_with(0, &["--bootstrap-expect", "1"])
        .expect("start 0");
    net.wait_cluster(&[0], 1, Duration::from_secs(60))
        .await
        .expect("cluster");
    let h = &net.hosts[1];
    let args: Vec<String> = [
        "server",
        "--insecure",
        "--data-dir",
        &h.data_dir.display().to_string(),
        "--listen",
        &format!("{}:{}", h.addr, netns::PORT),
        "--advertise",
        &h.url(),
        "--join",
        &net.hosts[0].url(),
        "--cluster-secret-file",
        &net.node_token_file.display().to_string(),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let mut child = net
        .spawn_in(1, "intruder", &bin().display().to_string(), &args)
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a server with the node token as cluster secret kept trying to join");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    let log =
        std::fs::read_to_string(h.data_dir.with_extension("intruder.log")).unwrap_or_default();
    assert!(
        log.contains("refused this server's cluster secret"),
        "{log}"
    );
    let info = net.client(0).cluster_info().await.expect("info");
    assert_eq!(info.members.len(), 1, "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_removing_the_last_voter_is_refused() {
    if !require("root", nix::unistd::geteuid().is_root()) {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    let info = c.cluster_info().await.expect("info");
    assert_eq!(info.members.len(), 1);
    assert!(info.cluster_id.is_some(), "{info:?}");
    let err = c
        .cluster_remove_server(info.node_id)
        .await
        .expect_err("removing the last voter must fail");
    assert!(err.to_string().contains("last voter"), "{err}");
}

/// An agent knows every server and keeps heartbeating through the survivors when the server
/// it talks to (the leader here) is killed: its node never goes down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_agent_fails_over_between_servers() {
    if !require("root, ip, tc and nft (netns harness)", netns::available()) {
        return;
    }
    let mut net = Net::new(bin(), 3).expect("netns hosts");
    let s = net.slot();
    let (bridge, pool) = (
        format!("nhb{s}"),
        format!("10.{}.0.0/16", 230 + u32::from(s % 20)),
    );
    net.start_servers(&[
        "--heartbeat-grace",
        "4",
        "--bridge",
        &bridge,
        "--node-pool",
        &pool,
    ])
    .expect("servers");
    let l = net
        .wait_cluster(&[0, 1, 2], 3, Duration::from_secs(60))
        .await
        .expect("cluster");
    // The agent (in the root namespace) lists the leader first.
    let mut urls = net.urls();
    urls.swap(0, l);
    let dir = net.scratch().join("agent");
    let log = std::fs::File::create(dir.with_extension("log")).expect("log");
    let mut cmd = std::process::Command::new(bin());
    cmd.arg("agent");
    for u in &urls {
        cmd.args(["--server", u]);
    }
    let mut agent = cmd
        .arg("--token-file")
        .arg(&net.node_token_file)
        .args(["--name", "ha-node", "--data-dir"])
        .arg(&dir)
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("agent");
    let survivor = net.client((l + 1) % 3);
    let registered = nimbus_testkit::eventually(Duration::from_secs(60), || async {
        let nodes = survivor.list_nodes().await.ok()?;
        nodes
            .iter()
            .any(|n| n.meta.name == "ha-node" && n.state == nimbus_api::NodeState::Ready)
            .then_some(())
    })
    .await;
    assert!(registered.is_some(), "agent never registered");
    net.kill9(l);
    // Well past the 4 s grace: the node must still be ready (heartbeats via a survivor).
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let nodes = survivor
            .with_timeout(Duration::from_secs(5))
            .list_nodes()
            .await
            .unwrap_or_default();
        let n = nodes
            .iter()
            .find(|n| n.meta.name == "ha-node")
            .expect("node listed");
        assert_eq!(
            n.state,
            nimbus_api::NodeState::Ready,
            "the node went down when one server died"
        );
    }
    let _ = agent.kill();
    let _ = agent.wait();
    nimbus_testkit::remove_datapath(&bridge);
}

/// An agent pointed at an address that answers HTTP but is not a nimbus server stops at once
/// with one readable line instead of retrying forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_agent_pointed_at_a_non_server_address_fails_clearly() {
    use std::io::{Read as _, Write as _};
    // A web server that is not nimbus: every request gets an HTML 404.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for conn in listener.incoming().take(20) {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let body = "<html><body>Not Found</body></html>";
            let _ = write!(
                conn,
                "HTTP/1.1 404 Not Found\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let tmp = tempfile::tempdir().expect("tmp");
    let token = tmp.path().join("node.token");
    std::fs::write(&token, "x".repeat(64)).expect("token");
    let mut child = std::process::Command::new(bin())
        .args([
            "agent",
            "--server",
            &format!("http://{addr}"),
            "--token-file",
        ])
        .arg(&token)
        .args(["--name", "lost", "--data-dir"])
        .arg(tmp.path().join("agent"))
        .args(["--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("agent");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the agent kept running against a non-server address");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut err = String::new();
    let _ = child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err);
    assert!(!status.success(), "{err}");
    let line = err
        .lines()
        .find(|l| l.starts_with("error: "))
        .unwrap_or_else(|| panic!("no error line: {err}"));
    assert!(
        line.contains(&format!("http://{addr}"))
            && line.contains("does not look like a nimbus server"),
        "{line}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

/// Leases use monotonic time: the wall clock of the node running server and agent jumps two
/// hours ahead, then three hours back (libfaketime), and its node is never marked down, its
/// heartbeats continue and writes keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_clock_jumps_do_not_expire_leases() {
    let lib = Path::new("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1");
    if !require("root", nix::unistd::geteuid().is_root())
        || !require("libfaketime (apt install libfaketime)", lib.exists())
    {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let offset = tmp.path().join("faketime");
    std::fs::write(&offset, "+0\n").expect("offset");
    let offset_s = offset.display().to_string();
    let lib_s = lib.display().to_string();
    let cloud = Cloud::start_with_env(
        bin(),
        &[
            ("LD_PRELOAD", lib_s.as_str()),
            ("FAKETIME_TIMESTAMP_FILE", offset_s.as_str()),
            ("FAKETIME_NO_CACHE", "1"),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ],
    )
    .expect("nimbus up");
    let c = cloud.client();
    let heartbeat = |c: Client| async move {
        let n = c.list_nodes().await.expect("nodes");
        assert_eq!(n.len(), 1);
        assert_eq!(
            n[0].state,
            nimbus_api::NodeState::Ready,
            "the node was marked down: {n:?}"
        );
        n[0].last_heartbeat.clone()
    };
    let before = heartbeat(c.clone()).await;
    for (k, jump) in ["+2h", "-3h"].iter().enumerate() {
        std::fs::write(&offset, format!("{jump}\n")).expect("jump");
        // Longer than the default 10 s heartbeat grace, polling all along.
        let mut last = heartbeat(c.clone()).await;
        let mut changed = 0;
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let hb = heartbeat(c.clone()).await;
            if hb != last {
                changed += 1;
                last = hb;
            }
        }
        assert!(changed >= 3, "heartbeats stopped after the {jump} jump");
        c.create_project(&format!("after-jump-{k}"))
            .await
            .expect("a write after the clock jump");
        eprintln!("{jump}: heartbeat recorded at {last} (before: {before})");
        if k == 0 {
            assert!(
                last > before,
                "the faked clock is ahead: {last} vs {before}"
            );
        } else {
            assert!(
                last < before,
                "the faked clock is behind: {last} vs {before}"
            );
        }
    }
    let events = c.events(None, 0).await.expect("events");
    assert!(
        !events.iter().any(|e| e.reason.contains("Down")),
        "{events:?}"
    );
}
