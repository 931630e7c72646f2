//! RaftNode: single-voter bootstrap, writes, restart, snapshots, corrupt data dirs, and a small
//! cluster over the HTTP transport.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};

use nimbus_state::raft::node::{RaftConfig, RaftNode, DB_FILE};
use nimbus_state::raft::{raft_router, OpenError, WriteError};
use nimbus_state::{Command, CommandEnvelope, CommandOutput, COMMAND_FORMAT_VERSION};

const SECRET: &str = "test-secret";

fn noop() -> CommandEnvelope {
    CommandEnvelope {
        format: COMMAND_FORMAT_VERSION,
        time: "2026-01-01T00:00:00Z".into(),
        new_id: "x".into(),
        command: Command::Noop,
    }
}

fn config(dir: &Path, node_id: u64, url: &str, snapshot_every: u64) -> RaftConfig {
    RaftConfig {
        node_id,
        data_dir: dir.to_owned(),
        advertise_url: url.to_owned(),
        cluster_secret: SECRET.to_owned(),
        snapshot_every,
    }
}

async fn write_noops(node: &RaftNode, n: usize) -> u64 {
    let mut last = 0;
    for _ in 0..n {
        let (index, res) = node.write_indexed(noop()).await.expect("write");
        assert_eq!(res, Ok(CommandOutput::None));
        assert!(index > last, "indexes increase");
        last = index;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_voter_write_restart() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1, "http://127.0.0.1:1", 5000);

    let started = Instant::now();
    let node = RaftNode::open(cfg.clone()).await.unwrap();
    node.bootstrap_single().await.unwrap();
    let first = node.write(noop()).await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(first, Ok(CommandOutput::None));
    assert!(
        elapsed < Duration::from_secs(2),
        "bootstrap + first write took {elapsed:?}"
    );
    assert!(node.is_leader());
    assert_eq!(node.leader(), Some(1));

    let mut applied = node.applied_watch();
    let last = write_noops(&node, 20).await;
    assert_eq!(node.read(|s| s.revision), last);
    assert!(*applied.borrow_and_update() >= last);
    node.linearizable_barrier().await.unwrap();
    node.shutdown().await;
    drop(node);

    let node = RaftNode::open(cfg.clone()).await.unwrap();
    // The committed log is re-applied at startup, before any election.
    assert_eq!(node.read(|s| s.revision), last);
    node.bootstrap_single().await.unwrap();
    let next = write_noops(&node, 1).await;
    assert!(next > last);
    assert_eq!(node.read(|s| s.revision), next);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_get_distinct_indexes() {
    let dir = tempfile::tempdir().unwrap();
    let node = RaftNode::open(config(dir.path(), 1, "http://127.0.0.1:1", 5000))
        .await
        .unwrap();
    node.bootstrap_single().await.unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let node = node.clone();
            tokio::spawn(async move { node.write_indexed(noop()).await.unwrap().0 })
        })
        .collect();
    let mut indexes = BTreeSet::new();
    for t in tasks {
        indexes.insert(t.await.unwrap());
    }
    assert_eq!(indexes.len(), 50, "every write got its own index");
    assert_eq!(node.read(|s| s.revision), *indexes.last().unwrap());
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_purge_and_restore() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1, "http://127.0.0.1:1", 10);
    let node = RaftNode::open(cfg.clone()).await.unwrap();
    node.bootstrap_single().await.unwrap();
    let last = write_noops(&node, 45).await;
    let m = node
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.snapshot.is_some() && m.purged.is_some(),
            "snapshot and purge",
        )
        .await
        .unwrap();
    let snap = m.snapshot.unwrap().index;
    let purged = m.purged.unwrap().index;
    assert!(snap >= 30, "snapshot at {snap}");
    assert!(
        purged > 0 && purged <= snap,
        "purged up to {purged}, snapshot at {snap}"
    );
    node.shutdown().await;
    drop(node);

    let node = RaftNode::open(cfg).await.unwrap();
    assert_eq!(node.read(|s| s.revision), last);
    node.raft()
        .wait(Some(Duration::from_secs(5)))
        .metrics(
            |m| {
                m.snapshot.is_some_and(|s| s.index >= snap)
                    && m.purged.is_some_and(|p| p.index >= purged)
            },
            "snapshot and purge state restored",
        )
        .await
        .unwrap();
    node.bootstrap_single().await.unwrap();
    let next = write_noops(&node, 1).await;
    assert_eq!(node.read(|s| s.revision), next);
    node.shutdown().await;
}

#[tokio::test]
async fn garbage_database_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join(DB_FILE),
        b"this is not a redb file, just some text".repeat(200),
    )
    .unwrap();
    let err = RaftNode::open(config(dir.path(), 1, "http://127.0.0.1:1", 100))
        .await
        .unwrap_err();
    assert!(matches!(err, OpenError::Database { .. }), "{err:?}");
    assert!(err.to_string().contains(DB_FILE), "{err}");
}

#[tokio::test]
async fn corrupt_snapshot_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = redb::Database::create(dir.path().join(DB_FILE)).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let table: redb::TableDefinition<&str, &[u8]> =
                redb::TableDefinition::new("raft_snapshot");
            let mut t = tx.open_table(table).unwrap();
            let meta = serde_json::to_vec(&nimbus_state::raft::SnapshotMeta::default()).unwrap();
            t.insert("meta", meta.as_slice()).unwrap();
            t.insert("data", b"{not json".as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }
    let err = RaftNode::open(config(dir.path(), 1, "http://127.0.0.1:1", 100))
        .await
        .unwrap_err();
    assert!(matches!(err, OpenError::Snapshot { .. }), "{err:?}");
}

#[tokio::test]
async fn data_dir_of_another_node_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let node = RaftNode::open(config(dir.path(), 1, "http://127.0.0.1:1", 100))
        .await
        .unwrap();
    node.shutdown().await;
    drop(node);
    let err = RaftNode::open(config(dir.path(), 2, "http://127.0.0.1:1", 100))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::NodeIdMismatch {
                found: 1,
                expected: 2,
                ..
            }
        ),
        "{err:?}"
    );
}

/// A node served over HTTP on a free local port.
async fn serve(dir: &Path, id: u64, snapshot_every: u64) -> (RaftNode, String) {
    let (node, url, _server) = serve_at(dir, id, snapshot_every, "127.0.0.1:0").await;
    (node, url)
}

/// Like [`serve`] on a given address; also returns the server task.
async fn serve_at(
    dir: &Path,
    id: u64,
    snapshot_every: u64,
    addr: &str,
) -> (RaftNode, String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let node = RaftNode::open(config(dir, id, &url, snapshot_every))
        .await
        .unwrap();
    let router = raft_router(node.clone());
    let server = tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (node, url, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_http_with_snapshot_transfer() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (n1, _u1) = serve(dirs[0].path(), 1, 10).await;
    let (n2, u2) = serve(dirs[1].path(), 2, 10).await;
    let (n3, u3) = serve(dirs[2].path(), 3, 10).await;

    n1.bootstrap_single().await.unwrap();
    // Enough writes that node 1 snapshots and purges: node 2 must be sent the snapshot.
    write_noops(&n1, 30).await;
    n1.raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(|m| m.purged.is_some(), "purged")
        .await
        .unwrap();

    n1.add_learner(2, u2.clone()).await.unwrap();
    n1.add_learner(3, u3).await.unwrap();
    n1.change_voters([1, 2, 3].into()).await.unwrap();
    let last = write_noops(&n1, 5).await;

    for n in [&n2, &n3] {
        n.raft()
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(Some(last), "replicated")
            .await
            .unwrap();
        assert_eq!(n.read(|s| s.revision), last);
        assert_eq!(n.leader(), Some(1));
        match n.write(noop()).await {
            Err(WriteError::ForwardToLeader {
                leader_id: Some(1),
                leader_url: Some(url),
            }) => {
                assert!(url.starts_with("http://127.0.0.1:"));
            }
            other => panic!("expected ForwardToLeader, got {other:?}"),
        }
    }
    assert!(
        n2.raft().metrics().borrow().snapshot.is_some(),
        "node 2 got a snapshot"
    );

    // A missing secret is refused before the body is looked at.
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{u2}/raft/vote"))
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);

    // Losing one of three voters keeps the cluster writable; peers are merely unreachable.
    n3.shutdown().await;
    write_noops(&n1, 3).await;
    n1.linearizable_barrier().await.unwrap();

    n1.shutdown().await;
    n2.shutdown().await;
}

#[tokio::test]
async fn unreachable_peer_is_reported_as_unreachable() {
    use nimbus_state::raft::network::HttpNetworkFactory;
    use openraft::error::RPCError;
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    use openraft::raft::VoteRequest;

    // Bind and drop a listener to get a local port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut factory = HttpNetworkFactory::new(SECRET);
    let mut client = factory
        .new_client(
            9,
            &openraft::BasicNode::new(format!("http://127.0.0.1:{port}")),
        )
        .await;
    let req = VoteRequest::new(openraft::Vote::new(1, 1), None);
    let err = client
        .vote(req, RPCOption::new(Duration::from_secs(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_refused() {
    use nimbus_state::raft::network::HttpNetworkFactory;
    use openraft::error::RPCError;
    use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
    use openraft::raft::VoteRequest;

    let dir = tempfile::tempdir().unwrap();
    let (node, url) = serve(dir.path(), 1, 100).await;
    let mut factory = HttpNetworkFactory::new("not-the-secret");
    let mut client = factory
        .new_client(1, &openraft::BasicNode::new(url.clone()))
        .await;
    let req = VoteRequest::new(openraft::Vote::new(1, 2), None);
    let err = client
        .vote(req.clone(), RPCOption::new(Duration::from_secs(2)))
        .await
        .unwrap_err();
    assert!(matches!(err, RPCError::Unreachable(_)), "{err:?}");

    // The right secret gets an answer from Raft.
    let mut factory = HttpNetworkFactory::new(SECRET);
    let mut client = factory.new_client(1, &openraft::BasicNode::new(url)).await;
    client
        .vote(req, RPCOption::new(Duration::from_secs(2)))
        .await
        .unwrap();
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_failover_and_rejoin() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (n1, u1, s1) = serve_at(dirs[0].path(), 1, 1000, "127.0.0.1:0").await;
    let (n2, u2, _s2) = serve_at(dirs[1].path(), 2, 1000, "127.0.0.1:0").await;
    let (n3, u3, _s3) = serve_at(dirs[2].path(), 3, 1000, "127.0.0.1:0").await;
    n1.bootstrap_single().await.unwrap();
    n1.add_learner(2, u2).await.unwrap();
    n1.add_learner(3, u3).await.unwrap();
    n1.change_voters([1, 2, 3].into()).await.unwrap();
    let before = write_noops(&n1, 5).await;

    // Kill the leader: one of the others takes over.
    n1.shutdown().await;
    s1.abort();
    drop(n1);
    let m = n2
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .metrics(
            |m| m.current_leader.is_some_and(|l| l != 1),
            "new leader elected",
        )
        .await
        .unwrap();
    let leader = if m.current_leader == Some(2) {
        &n2
    } else {
        &n3
    };
    let after = write_noops(leader, 5).await;
    assert!(after > before);

    // The old leader restarts from its data dir on its old address and catches up.
    let addr = u1.trim_start_matches("http://").to_owned();
    let (n1, _, _s1) = serve_at(dirs[0].path(), 1, 1000, &addr).await;
    assert!(n1.read(|s| s.revision) >= before, "restored its own state");
    n1.raft()
        .wait(Some(Duration::from_secs(10)))
        .applied_index_at_least(Some(after), "caught up")
        .await
        .unwrap();
    assert_eq!(n1.read(|s| s.revision), after);
    assert!(!n1.is_leader());

    for n in [&n1, &n2, &n3] {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_command_result_comes_back_and_is_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), 1, "http://127.0.0.1:1", 5000);
    let node = RaftNode::open(cfg.clone()).await.unwrap();
    node.bootstrap_single().await.unwrap();
    let mut env = noop();
    env.format = COMMAND_FORMAT_VERSION + 1;
    let (index, res) = node.write_indexed(env).await.unwrap();
    assert!(
        res.is_err(),
        "a command from a newer format is refused: {res:?}"
    );
    assert_eq!(node.read(|s| s.revision), index);
    let last = write_noops(&node, 2).await;
    node.shutdown().await;
    drop(node);

    // Replaying the log (including the refused entry) at startup is deterministic.
    let node = RaftNode::open(cfg).await.unwrap();
    assert_eq!(node.read(|s| s.revision), last);
    node.shutdown().await;
}
