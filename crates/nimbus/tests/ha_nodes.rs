//! High availability of compute nodes and images in a three-server cluster, each server and
//! each agent in its own network namespace (`testkit::netns`), with real runc containers:
//!
//! - kill -9 of a compute node's agent and a network partition of a compute node: its
//!   `restart: always` instances run on the other node; the node that comes back stops the
//!   copies that were moved away (fencing), so no instance runs twice; meanwhile a client
//!   writes and reads through the servers and the history checker verifies the control plane
//!   lost nothing;
//! - image blobs uploaded through one server are replicated to the others, so an agent that
//!   only knows another server can run the image after the uploading server died.

use std::path::Path;
use std::time::Duration;

use nimbus_api::{CreateInstanceRequest, InstanceState, NodeState, RestartPolicy};
use nimbus_client::Client;
use nimbus_testkit::history::Workload;
use nimbus_testkit::netns::{self, Net};
use nimbus_testkit::{eventually, have, pid_alive, require};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

fn deps() -> bool {
    require("root, ip, tc and nft (netns harness)", netns::available())
        && require("runc", have("runc"))
        && require("/bin/busybox", Path::new("/bin/busybox").exists())
}

const SERVERS: [usize; 3] = [0, 1, 2];

/// Three servers on hosts 0..2 (heartbeat grace 6 s, a per-slot bridge and node pool).
async fn servers(hosts: usize) -> Net {
    let mut net = Net::new(bin(), hosts).expect("netns hosts");
    let s = net.slot();
    let pool = format!("10.{}.0.0/16", 200 + u32::from(s % 20));
    net.start_servers_on(
        &SERVERS,
        &[
            "--heartbeat-grace",
            "6",
            "--bridge",
            &format!("nhn{s}"),
            "--node-pool",
            &pool,
        ],
    )
    .expect("servers");
    net.wait_cluster(&SERVERS, 3, Duration::from_secs(60))
        .await
        .expect("cluster");
    net
}

/// Waits until nodes `names` are ready and the cluster defaults (busybox, default project)
/// are written.
async fn nodes_ready(net: &Net, c: &Client, names: &[&str]) {
    let ok = eventually(Duration::from_secs(60), || async {
        let nodes = c.list_nodes().await.ok()?;
        let images = c.list_images().await.ok()?;
        (names.iter().all(|n| {
            nodes
                .iter()
                .any(|x| x.meta.name == *n && x.state == NodeState::Ready)
        }) && images.iter().any(|i| i.meta.name == "busybox"))
        .then_some(())
    })
    .await;
    assert!(
        ok.is_some(),
        "nodes {names:?} not ready\n{}\n{}",
        net.logs_tail(10),
        (0..net.hosts.len())
            .map(|i| net.agent_log(i))
            .collect::<Vec<_>>()
            .join("\n")
    );
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

/// Waits until every instance of `names` runs on `node`; returns them.
async fn all_running_on(
    net: &Net,
    c: &Client,
    names: &[&str],
    node: &str,
    within: Duration,
) -> Vec<nimbus_api::Instance> {
    let got = eventually(within, || async {
        let mut out = Vec::new();
        for n in names {
            let i = c.get_instance(n).await.ok()?;
            if i.status.state != InstanceState::Running
                || i.status.node.as_deref() != Some(node)
                || i.status.pid.is_none()
            {
                return None;
            }
            out.push(i);
        }
        Some(out)
    })
    .await;
    match got {
        Some(list) => list,
        None => panic!(
            "{names:?} not running on {node} within {within:?}: {:?}\n{}",
            status_of(c, names).await,
            net.logs_tail(10)
        ),
    }
}

async fn status_of(c: &Client, names: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for n in names {
        out.push(format!(
            "{n}: {:?}",
            c.get_instance(n).await.map(|i| i.status)
        ));
    }
    out
}

async fn node_events(c: &Client) -> Vec<String> {
    c.events(None, 0)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|e| e.kind == "node")
        .map(|e| format!("{} {} {} {}", e.time, e.name, e.reason, e.message))
        .collect()
}

async fn node_state(c: &Client, name: &str) -> Option<NodeState> {
    c.list_nodes()
        .await
        .ok()?
        .into_iter()
        .find(|n| n.meta.name == name)
        .map(|n| n.state)
}

/// Waits until all `pids` have exited.
async fn all_gone(pids: &[u32], within: Duration) -> bool {
    eventually(within, || async {
        pids.iter().all(|&p| !pid_alive(p)).then_some(())
    })
    .await
    .is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_compute_node_kill9_and_partition_never_run_an_instance_twice() {
    if !deps() {
        return;
    }
    // Hosts 0..2: servers; host 3: node "na"; host 4: node "nb".
    let mut net = servers(5).await;
    net.start_agent(3, "na", &[]).expect("agent na");
    net.start_agent(4, "nb", &[]).expect("agent nb");
    let c = net.client(1);
    nodes_ready(&net, &c, &["na", "nb"]).await;
    let w = Workload::start(&net, &SERVERS, "cn");
    let names = ["ka", "kb"];

    // Two restart=always instances on nb.
    c.cordon_node("na", true).await.expect("cordon");
    for n in names {
        c.create_instance(&instance(n), None).await.expect("create");
    }
    let on_nb = all_running_on(&net, &c, &names, "nb", Duration::from_secs(60)).await;
    c.cordon_node("na", false).await.expect("uncordon");

    // Fault 1: kill -9 nb's agent. Its instances come back on na; nb is down.
    net.kill9_agent(4);
    let on_na = all_running_on(&net, &c, &names, "na", Duration::from_secs(40)).await;
    for (old, new) in on_nb.iter().zip(&on_na) {
        assert!(new.status.generation > old.status.generation);
    }
    assert_eq!(node_state(&c, "nb").await, Some(NodeState::Down));
    let stale: Vec<u32> = on_nb.iter().filter_map(|i| i.status.pid).collect();
    assert!(
        stale.iter().all(|&p| pid_alive(p)),
        "without its agent, nb's copies keep running (the shim outlives the agent)"
    );
    // nb comes back: it stops the copies that were moved away, and is ready again.
    net.restart_agent(4).expect("restart agent");
    assert!(
        all_gone(&stale, Duration::from_secs(30)).await,
        "the returning node must stop the instances that were moved away\n{}",
        net.agent_log(4)
    );
    let back = eventually(Duration::from_secs(30), || async {
        (node_state(&c, "nb").await == Some(NodeState::Ready)).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "nb is ready again: {:?}\n{}",
        node_state(&c, "nb").await,
        net.agent_log(4)
    );
    let events = c.events(None, 0).await.expect("events");
    assert!(
        names.iter().all(|n| events
            .iter()
            .any(|e| e.name == *n && e.reason == "Rescheduled")),
        "{events:?}"
    );

    // Fault 2: partition na (now holding both) from every other host. After the grace period
    // its instances run on nb, while na's copies still run (na cannot know yet).
    net.partition(3).expect("partition");
    let on_nb2 = all_running_on(&net, &c, &names, "nb", Duration::from_secs(40)).await;
    let stale: Vec<u32> = on_na.iter().filter_map(|i| i.status.pid).collect();
    assert!(
        stale.iter().all(|&p| pid_alive(p)),
        "the partitioned node's copies run until it hears from the servers\n{}",
        net.agent_log(3)
    );
    // The partition heals: na stops its copies at once; each instance runs exactly once, on nb.
    net.heal(3).expect("heal");
    assert!(
        all_gone(&stale, Duration::from_secs(30)).await,
        "a healed node must stop the instances that moved away\n{}",
        net.agent_log(3)
    );
    let back = eventually(Duration::from_secs(30), || async {
        (node_state(&c, "na").await == Some(NodeState::Ready)).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "na is ready again: {:?}\nnode events: {:?}\n{}\n{}",
        node_state(&c, "na").await,
        node_events(&c).await,
        net.agent_log(3),
        net.logs_tail(15)
    );
    // A while after healing nothing flips back: the same placements, the same live processes.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let now = all_running_on(&net, &c, &names, "nb", Duration::from_secs(5)).await;
    for (a, b) in on_nb2.iter().zip(&now) {
        assert_eq!(a.status.generation, b.status.generation, "{}", a.meta.name);
        assert_eq!(a.status.pid, b.status.pid, "{}", a.meta.name);
        assert!(pid_alive(b.status.pid.unwrap_or(0)), "{}", a.meta.name);
    }
    w.finish(&net).await;
    for n in names {
        let _ = c.delete_instance(n).await;
    }
    let cleaned = eventually(Duration::from_secs(30), || async {
        c.list_instances().await.ok()?.is_empty().then_some(())
    })
    .await;
    assert!(cleaned.is_some(), "instances deleted");
}

/// A two-layer image (busybox below, `/hello.txt` on top) as an OCI layout tarball.
fn greeter_tarball(dir: &Path) -> std::path::PathBuf {
    use nimbus_image::testutil::{self, FixtureConfig, LayerEntry};
    let store = nimbus_image::ImageStore::open(&dir.join("store")).expect("store");
    let bb = store
        .build_busybox(Path::new("/bin/busybox"))
        .expect("busybox");
    let base = testutil::layer_from_dir(&store.unpacked_layer(&bb.layers[0]).expect("unpack"))
        .expect("layer");
    let top = testutil::layer_tar(&[LayerEntry::file(
        "hello.txt",
        b"hello from a replicated image\n",
    )])
    .expect("layer");
    let cfg = FixtureConfig {
        name: Some("greeter:1".into()),
        cmd: vec!["sleep".into(), "3600".into()],
        env: vec!["PATH=/bin".into()],
        gzip_layers: true,
        ..FixtureConfig::default()
    };
    let path = dir.join("greeter.tar");
    testutil::write_oci_layout_tarball_layers(&[base, top], &path, &cfg).expect("tarball");
    path
}

/// `GET {server}/v1/images/blobs/{digest}` with the node token; `local` asks the server not to
/// fetch from its peers. Returns the status and body.
async fn get_blob(net: &Net, host: usize, digest: &str, local: bool) -> (u16, Vec<u8>) {
    let token = std::fs::read_to_string(&net.node_token_file).expect("token");
    let url = format!(
        "{}/v1/images/blobs/{digest}{}",
        net.hosts[host].url(),
        if local { "?local=true" } else { "" }
    );
    let resp = reqwest::Client::new()
        .get(url)
        .bearer_auth(token.trim())
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .expect("blob request");
    let status = resp.status().as_u16();
    (status, resp.bytes().await.unwrap_or_default().to_vec())
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_image_uploaded_to_one_server_runs_via_another_after_it_died() {
    if !deps() {
        return;
    }
    let mut net = servers(4).await;
    // The agent knows server 2 only.
    let only = vec![net.hosts[2].url()];
    net.start_agent_with(3, "nc", &only, &[]).expect("agent");
    let c0 = net.client(0);
    nodes_ready(&net, &c0, &["nc"]).await;
    let tmp = tempfile::tempdir().expect("tmp");
    let img = c0
        .import_image(&greeter_tarball(tmp.path()), Some("greeter"))
        .await
        .expect("import through server 0");
    assert_eq!(img.layers.len(), 2);
    let top = img.layers[1].clone();

    // On demand: server 1 serves a layer it was never sent (fetched from a peer, verified).
    let (status, body) = get_blob(&net, 1, &top, false).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(sha256(&body), top, "served bytes match the digest");
    // A digest nobody holds is a 404, not a hang or a loop between servers.
    let missing = format!("sha256:{}", "ab".repeat(32));
    assert_eq!(get_blob(&net, 1, &missing, false).await.0, 404);

    // In the background: server 2 holds every layer without being asked for it.
    let replicated = eventually(Duration::from_secs(30), || async {
        for l in &img.layers {
            if get_blob(&net, 2, l, true).await.0 != 200 {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert!(
        replicated.is_some(),
        "server 2 never replicated the layers\n{}",
        net.logs_tail(20)
    );

    // The uploading server dies; the agent (talking to server 2 only) runs the image.
    net.kill9(0);
    let c2 = net.client(2);
    net.wait_cluster(&[1, 2], 3, Duration::from_secs(30))
        .await
        .expect("a leader among the survivors");
    let req = CreateInstanceRequest {
        name: "greet".into(),
        image: "greeter".into(),
        memory: Some(serde_json::json!("16M")),
        cpus: Some(0.1),
        ..Default::default()
    };
    c2.create_instance(&req, None).await.expect("create");
    all_running_on(&net, &c2, &["greet"], "nc", Duration::from_secs(60)).await;
    let r = c2
        .exec("greet", vec!["cat".into(), "/hello.txt".into()])
        .await
        .expect("exec");
    assert_eq!(r.stdout, "hello from a replicated image\n");
    c2.delete_instance("greet").await.expect("delete");
    let cleaned = eventually(Duration::from_secs(30), || async {
        c2.list_instances().await.ok()?.is_empty().then_some(())
    })
    .await;
    assert!(cleaned.is_some(), "instance deleted");
}
