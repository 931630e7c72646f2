//! End to end with two nodes on this machine (`nimbus up` plus a second `nimbus agent`): drain
//! moves real containers, a dead node's `restart=always` instances fail over, and the node that
//! comes back removes what was moved away (fencing).

use std::path::Path;
use std::time::Duration;

use nimbus_api::{CreateInstanceRequest, InstanceState, RestartPolicy};
use nimbus_client::Client;
use nimbus_testkit::{eventually, have, pid_alive, require, Cloud};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

fn deps() -> bool {
    require("root", nix::unistd::geteuid().is_root())
        && require("runc", have("runc"))
        && require("/bin/busybox", Path::new("/bin/busybox").exists())
}

async fn running_on(c: &Client, name: &str, node: &str) -> nimbus_api::Instance {
    let got = eventually(Duration::from_secs(60), || async {
        c.get_instance(name).await.ok().filter(|i| {
            i.status.state == InstanceState::Running && i.status.node.as_deref() == Some(node)
        })
    })
    .await;
    match got {
        Some(i) => i,
        None => panic!(
            "{name} never ran on {node}: {:?}",
            c.get_instance(name).await.map(|i| i.status)
        ),
    }
}

fn req(name: &str, restart: RestartPolicy) -> CreateInstanceRequest {
    CreateInstanceRequest {
        name: name.into(),
        image: "busybox".into(),
        memory: Some(serde_json::json!("16M")),
        cpus: Some(0.1),
        restart,
        command: vec![
            "sh".into(),
            "-c".into(),
            "echo $HOSTNAME > /tmp/who; sleep 3600".into(),
        ],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_containers_and_failover_fences_the_dead_node() {
    if !deps() {
        return;
    }
    let mut cloud = Cloud::start(bin()).expect("nimbus up");
    cloud.add_agent("node2").expect("second agent");
    let c = cloud.client();
    let nodes = c.list_nodes().await.unwrap();
    assert_eq!(nodes.len(), 2);
    let node2 = nodes.iter().find(|n| n.meta.name == "node2").unwrap();
    assert!(node2.capabilities.containers);

    // Two instances on node1 (node2 cordoned while they are placed).
    c.cordon_node("node2", true).await.unwrap();
    c.create_instance(&req("a", RestartPolicy::Never), None)
        .await
        .unwrap();
    c.create_instance(&req("b", RestartPolicy::Never), None)
        .await
        .unwrap();
    let a1 = running_on(&c, "a", "node1").await;
    running_on(&c, "b", "node1").await;
    c.cordon_node("node2", false).await.unwrap();

    // Drain node1 through the CLI: both move to node2 and run there; the old processes are gone.
    let out = cloud
        .cli()
        .args(["node", "drain", "node1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a2 = running_on(&c, "a", "node2").await;
    running_on(&c, "b", "node2").await;
    assert!(a2.status.generation > a1.status.generation);
    let old_pid = a1.status.pid.unwrap();
    assert!(
        eventually(Duration::from_secs(20), || async {
            (!pid_alive(old_pid)).then_some(())
        })
        .await
        .is_some(),
        "the drained container must stop on node1"
    );
    let r = c
        .exec("a", vec!["cat".into(), "/tmp/who".into()])
        .await
        .unwrap();
    assert_eq!(r.stdout.trim(), "a");
    let nodes = cloud
        .cli()
        .args(["node", "list", "-o", "json"])
        .output()
        .unwrap();
    let nodes: serde_json::Value = serde_json::from_slice(&nodes.stdout).unwrap();
    assert!(nodes
        .as_array()
        .unwrap()
        .iter()
        .any(|n| n["name"] == "node1" && n["cordoned"] == true));

    // Failover: a restart=always instance on node2; node2's agent dies; after the grace period
    // node2 is down and the instance runs on node1 again.
    cloud
        .cli()
        .args(["node", "uncordon", "node1"])
        .output()
        .unwrap();
    c.cordon_node("node1", true).await.unwrap();
    c.create_instance(&req("ha", RestartPolicy::Always), None)
        .await
        .unwrap();
    let ha1 = running_on(&c, "ha", "node2").await;
    c.cordon_node("node1", false).await.unwrap();
    cloud.kill_agent("node2");
    let ha2 = eventually(Duration::from_secs(40), || async {
        c.get_instance("ha").await.ok().filter(|i| {
            i.status.state == InstanceState::Running && i.status.node.as_deref() == Some("node1")
        })
    })
    .await
    .expect("the restart=always instance must fail over to node1");
    assert!(ha2.status.generation > ha1.status.generation);
    let down = c
        .list_nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.meta.name == "node2")
        .unwrap();
    assert_eq!(down.state, nimbus_api::NodeState::Down);
    let events = c.events(None, 0).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.name == "ha" && e.reason == "Rescheduled"),
        "{events:?}"
    );

    // node2 comes back: it removes the instance that moved away (same name never runs twice).
    let stale_pid = ha1.status.pid.unwrap();
    assert!(
        pid_alive(stale_pid),
        "without its agent, node2's copy still runs"
    );
    cloud.restart_agent("node2").expect("agent restarts");
    assert!(
        eventually(Duration::from_secs(20), || async {
            (!pid_alive(stale_pid)).then_some(())
        })
        .await
        .is_some(),
        "the returning node must stop the instance that was moved away"
    );
    let back = eventually(Duration::from_secs(20), || async {
        c.list_nodes()
            .await
            .ok()?
            .into_iter()
            .find(|n| n.meta.name == "node2" && n.state == nimbus_api::NodeState::Ready)
    })
    .await;
    assert!(
        back.is_some(),
        "node2 is ready again after heartbeats resume"
    );
    running_on(&c, "ha", "node1").await;
    cloud.shutdown();
}

/// Heartbeats (every 2 s) and interface counters are leases and telemetry in the leader's
/// memory: a cloud at rest writes nothing to its Raft log (at most one utilisation snapshot per
/// 30 s), while the node stays ready with a fresh `last_heartbeat` and its counters shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_and_counters_stay_out_of_the_raft_log() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    c.create_instance(&req("quiet", RestartPolicy::Never), None)
        .await
        .expect("create");
    let inst = running_on(&c, "quiet", "node1").await;
    // Let the launch's own writes and the first counters report settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before = c.cluster_info().await.expect("cluster").applied_index;
    let hb_before = c.list_nodes().await.expect("nodes")[0]
        .last_heartbeat
        .clone();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let after = c.cluster_info().await.expect("cluster").applied_index;
    let nodes = c.list_nodes().await.expect("nodes");
    let node = &nodes[0];
    assert!(
        after <= before + 1,
        "a cloud at rest wrote {} log entries in 12 s (heartbeats every 2 s would be 6)",
        after - before
    );
    assert_eq!(node.state, nimbus_api::NodeState::Ready);
    assert!(
        node.last_heartbeat > hb_before,
        "last_heartbeat did not advance: {hb_before} -> {}",
        node.last_heartbeat
    );
    assert!(
        node.interfaces.iter().any(|i| i.instance == inst.meta.id),
        "the instance's counters are not shown on its node: {:?}",
        node.interfaces
    );
}
