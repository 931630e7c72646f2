//! The scheduler end to end on real processes: preemption evicting a real container, the
//! agent's measured utilisation reaching the node, and hollow nodes (`nimbus agent --hollow`,
//! the test mode the scheduler benchmark uses).

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nimbus_api::{CreateInstanceRequest, ErrorCode, InstanceState, RestartPolicy};
use nimbus_client::{Client, ClientError};
use nimbus_testkit::{eventually, have, pid_alive, require, Cloud};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

fn deps() -> bool {
    require("root", nix::unistd::geteuid().is_root())
        && require("runc", have("runc"))
        && require("/bin/busybox", Path::new("/bin/busybox").exists())
}

fn req(name: &str, memory: u64, class: &str) -> CreateInstanceRequest {
    CreateInstanceRequest {
        name: name.into(),
        image: "busybox".into(),
        memory: Some(serde_json::json!(memory)),
        cpus: Some(0.1),
        restart: RestartPolicy::Never,
        command: vec!["sleep".into(), "3600".into()],
        priority_class: Some(class.into()),
        ..Default::default()
    }
}

async fn running(c: &Client, name: &str) -> nimbus_api::Instance {
    let got = eventually(Duration::from_secs(60), || async {
        c.get_instance(name)
            .await
            .ok()
            .filter(|i| i.status.state == InstanceState::Running && i.status.pid.is_some())
    })
    .await;
    match got {
        Some(i) => i,
        None => panic!(
            "{name} never ran: {:?}",
            c.get_instance(name).await.map(|i| i.status)
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_stops_a_real_low_priority_container() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    let node = c.list_nodes().await.expect("nodes").remove(0);
    let memory = node.capacity.memory_bytes;
    // A low-priority container takes all but 512 MiB of the node's memory.
    c.create_instance(&req("low", memory - (512 << 20), "low"), None)
        .await
        .expect("create low");
    let low = running(&c, "low").await;
    let low_pid = low.status.pid.expect("pid");
    // A normal-priority request for 1 GiB fits nowhere and may not preempt an equal one...
    let err = c
        .create_instance(&req("peer", 1 << 30, "low"), None)
        .await
        .expect_err("an equal priority must not preempt");
    assert!(
        matches!(&err, ClientError::Api(e) if e.code == ErrorCode::Unschedulable),
        "{err}"
    );
    // ... but a high-priority one preempts the low one.
    let hi = c
        .create_instance(&req("urgent", 1 << 30, "high"), None)
        .await
        .expect("high priority placed by preemption");
    assert_eq!(hi.status.node, Some(node.meta.name.clone()));
    running(&c, "urgent").await;
    assert!(
        eventually(Duration::from_secs(30), || async {
            (!pid_alive(low_pid)).then_some(())
        })
        .await
        .is_some(),
        "the preempted container must stop"
    );
    let low = c.get_instance("low").await.expect("low");
    assert_eq!(low.status.state, InstanceState::Stopped);
    assert_eq!(low.status.node, None);
    assert!(
        low.status.message.contains("preempted by default/urgent"),
        "{}",
        low.status.message
    );
    let events = c.events(None, 0).await.expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.name == "low" && e.reason == "Preempted"),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| e.name == "urgent"
            && e.reason == "Scheduled"
            && e.message.contains("after preempting default/low")),
        "{events:?}"
    );
    // No room for it while the urgent one runs: starting it is refused with the reasons.
    let err = c
        .instance_action("low", "start")
        .await
        .expect_err("no room");
    assert!(err.to_string().contains("insufficient memory"), "{err}");
    // Once the urgent one is gone, it starts again (placed anew).
    c.delete_instance("urgent").await.expect("delete");
    eventually(Duration::from_secs(30), || async {
        c.get_instance("urgent").await.is_err().then_some(())
    })
    .await
    .expect("urgent deleted");
    c.instance_action("low", "start").await.expect("start low");
    let again = running(&c, "low").await;
    assert_ne!(again.status.pid, Some(low_pid));
    assert!(again.status.generation > low.status.generation);
    c.delete_instance("low").await.expect("delete");
    eventually(Duration::from_secs(30), || async {
        c.list_instances().await.ok()?.is_empty().then_some(())
    })
    .await
    .expect("cleaned up");
    cloud.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_reports_measured_utilisation() {
    if !require("root", nix::unistd::geteuid().is_root()) {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    // CPU needs two samples (heartbeats every 2 s).
    let u = eventually(Duration::from_secs(20), || async {
        c.list_nodes().await.ok()?.remove(0).utilization
    })
    .await
    .expect("the node reports its utilisation");
    assert!(u.cpu_permille <= 1000, "{u:?}");
    assert!(
        u.memory_permille > 0 && u.memory_permille <= 1000,
        "a running machine uses some memory: {u:?}"
    );
    assert!(u.network_permille <= 1000, "{u:?}");
    // The CLI shows it.
    let out = cloud
        .cli()
        .args(["node", "list", "-o", "json"])
        .output()
        .expect("cli");
    let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(
        nodes[0]["utilization"]["memory_permille"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "{nodes}"
    );
    cloud.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hollow_nodes_register_heartbeat_and_run_nothing() {
    if !require("root", nix::unistd::geteuid().is_root()) {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    // --hollow-count without --hollow is refused by the CLI.
    let out = Command::new(bin())
        .args(["agent", "--server", &cloud.url, "--token-file", "x"])
        .args(["--hollow-count", "3"])
        .output()
        .expect("cli");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--hollow"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_agent, _agent_dir) = hollow(&cloud, "hol", 5, 4, "8G");
    let nodes = c.list_nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 6, "{nodes:?}");
    for n in nodes.iter().filter(|n| n.meta.name.starts_with("hol-")) {
        assert_eq!(n.capacity.cpu_millis, 4000);
        assert_eq!(n.capacity.memory_bytes, 8 << 30);
        assert!(n.capabilities.containers && !n.capabilities.vms);
    }
    // Only hollow nodes take instances: they report them running, with no process.
    c.cordon_node(
        &nodes
            .iter()
            .find(|n| !n.meta.name.starts_with("hol-"))
            .expect("real")
            .meta
            .name,
        true,
    )
    .await
    .expect("cordon");
    for k in 0..10 {
        c.create_instance(&req(&format!("h{k}"), 64 << 20, "normal"), None)
            .await
            .expect("create");
    }
    let all = eventually(Duration::from_secs(30), || async {
        let list = c.list_instances().await.ok()?;
        (list.len() == 10
            && list
                .iter()
                .all(|i| i.status.state == InstanceState::Running))
        .then_some(list)
    })
    .await
    .expect("hollow nodes report their instances running");
    for i in &all {
        assert!(i
            .status
            .node
            .as_deref()
            .is_some_and(|n| n.starts_with("hol-")));
        assert_eq!(i.status.pid, Some(0), "nothing runs on a hollow node");
    }
    let spread: std::collections::BTreeSet<_> =
        all.iter().filter_map(|i| i.status.node.clone()).collect();
    assert_eq!(spread.len(), 5, "spread over the hollow nodes: {spread:?}");
    let err = c
        .exec("h0", vec!["true".into()])
        .await
        .expect_err("exec on a hollow node");
    assert!(err.to_string().contains("hollow node"), "{err}");
    for k in 0..10 {
        c.delete_instance(&format!("h{k}")).await.expect("delete");
    }
    eventually(Duration::from_secs(30), || async {
        c.list_instances().await.ok()?.is_empty().then_some(())
    })
    .await
    .expect("deleted through the hollow nodes");
    cloud.shutdown();
}

/// A `nimbus agent --hollow` fleet joined to `cloud`; killed on drop.
struct Hollow(std::process::Child);

impl Drop for Hollow {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn hollow(
    cloud: &Cloud,
    name: &str,
    count: u32,
    cpus: u32,
    memory: &str,
) -> (Hollow, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut child = Command::new(bin())
        .args([
            "agent",
            "--hollow",
            "--hollow-count",
            &count.to_string(),
            "--name",
            name,
        ])
        .args([
            "--hollow-cpus",
            &cpus.to_string(),
            "--hollow-memory",
            memory,
        ])
        .args(["--server", &cloud.url, "--token-file"])
        .arg(cloud.data_dir.join("node.token"))
        .arg("--data-dir")
        .arg(tmp.path())
        .args(["--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("hollow agent");
    let stdout = child.stdout.take().expect("stdout");
    let ready = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("ready"))
        .unwrap_or_default();
    assert!(
        ready.contains(&format!("{count} hollow node(s)")),
        "{ready}"
    );
    (Hollow(child), tmp)
}

fn best_effort(name: &str) -> CreateInstanceRequest {
    CreateInstanceRequest {
        name: name.into(),
        image: "busybox".into(),
        command: vec!["sleep".into(), "3600".into()],
        ..Default::default()
    }
}

/// Containers launched without sizes are best effort (no reservation), so a 1-CPU node takes
/// many; explicit sizes are still reservations. Lists page with `limit`/`continue` and the
/// client follows the pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn best_effort_containers_reserve_nothing_and_lists_page() {
    if !require("root", nix::unistd::geteuid().is_root()) {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    c.cordon_node("node1", true)
        .await
        .expect("cordon the real node");
    let (_fleet, _dir) = hollow(&cloud, "small", 1, 1, "1G");
    let t = std::time::Instant::now();
    for k in 0..120 {
        let i = c
            .create_instance(&best_effort(&format!("be{k:03}")), None)
            .await
            .unwrap_or_else(|e| panic!("best-effort container {k} refused: {e}"));
        assert_eq!((i.spec.cpus, i.spec.memory_bytes), (0.0, 0));
        assert_eq!(i.status.node.as_deref(), Some("small"));
    }
    eprintln!("120 creates took {:?}", t.elapsed());
    // 1 CPU overcommitted 4 times takes 4 CPUs of reservations, not 5.
    let mut sized = best_effort("sized");
    sized.cpus = Some(5.0);
    let e = c
        .create_instance(&sized, None)
        .await
        .expect_err("5 CPUs on a 1-CPU node");
    assert!(e.to_string().contains("insufficient cpu"), "{e}");
    // Pages of 50: 50 + 50 + 20, linked by `Link: rel="next"`.
    let http = reqwest::Client::new();
    let mut url = format!("{}/v1/projects/default/instances?limit=50", cloud.url);
    let mut pages = Vec::new();
    loop {
        let resp = http
            .get(&url)
            .bearer_auth(&cloud.token)
            .send()
            .await
            .expect("list");
        assert!(resp.status().is_success());
        let next = resp
            .headers()
            .get("link")
            .map(|v| v.to_str().unwrap().to_string());
        let page: Vec<nimbus_api::Instance> = resp.json().await.expect("page");
        pages.push(page.len());
        let Some(link) = next else { break };
        let target = link.split(['<', '>']).nth(1).expect("link target");
        assert!(link.ends_with("rel=\"next\""), "{link}");
        url = format!("{}{target}", cloud.url);
    }
    assert_eq!(pages, [50, 50, 20]);
    let all = c.list_instances().await.expect("all pages");
    assert_eq!(all.len(), 120);
    assert!(all.windows(2).all(|w| w[0].meta.name < w[1].meta.name));
    // Bad paging parameters are JSON errors naming the parameter.
    for (q, status, field) in [
        ("limit=0", 422, "limit"),
        ("limit=abc", 400, "limit"),
        ("continue=not-a-token", 400, "continue"),
    ] {
        let resp = http
            .get(format!("{}/v1/projects/default/instances?{q}", cloud.url))
            .bearer_auth(&cloud.token)
            .send()
            .await
            .expect("list");
        assert_eq!(resp.status().as_u16(), status, "{q}");
        let body: nimbus_api::ErrorBody = resp.json().await.expect("JSON error");
        assert_eq!(body.error.field.as_deref(), Some(field), "{q}");
    }
    cloud.shutdown();
}
