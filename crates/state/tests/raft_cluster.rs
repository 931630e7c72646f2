//! Server-cluster pieces of the Raft runtime: membership changes (add a server, refuse to
//! remove the last voter), the follower read index, and refusing log entries this build
//! cannot decode without stopping the node.

use std::path::Path;
use std::time::Duration;

use nimbus_state::raft::node::{RaftConfig, RaftNode};
use nimbus_state::raft::{raft_router, WriteError};
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

async fn serve(dir: &Path, id: u64) -> (RaftNode, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let node = RaftNode::open(RaftConfig {
        node_id: id,
        data_dir: dir.to_owned(),
        advertise_url: url.clone(),
        cluster_secret: SECRET.to_owned(),
        snapshot_every: 1000,
    })
    .await
    .unwrap();
    let router = raft_router(node.clone());
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    (node, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_server_read_index_and_last_voter() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (n1, _) = serve(dirs[0].path(), 1).await;
    let (n2, u2) = serve(dirs[1].path(), 2).await;
    n1.bootstrap_single().await.unwrap();
    // The last (only) voter cannot be removed.
    let err = n1.remove_server(1).await.unwrap_err();
    assert!(
        matches!(err, WriteError::Refused(ref m) if m.contains("last voter")),
        "{err:?}"
    );
    n1.write(noop()).await.unwrap().unwrap();
    n1.add_server(2, &u2).await.unwrap();
    // Idempotent.
    n1.add_server(2, &u2).await.unwrap();
    assert_eq!(n1.voter_ids().len(), 2);
    let idx = n1.read_index().await.unwrap();
    n2.wait_applied(idx, Duration::from_secs(5)).await.unwrap();
    assert!(n2.is_initialized().await);
    // A follower cannot answer a read index itself: it names the leader.
    assert!(matches!(
        n2.read_index().await,
        Err(WriteError::ForwardToLeader {
            leader_id: Some(1),
            ..
        })
    ));
    n1.remove_server(2).await.unwrap();
    assert_eq!(n1.members().len(), 1);
    n1.shutdown().await;
    n2.shutdown().await;
}

/// Replaces every `"op": ...` in a JSON value (the command tag) with an unknown command.
fn poison(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            if m.contains_key("op") {
                m.insert("op".into(), "teleport_instance".into());
            }
            m.values_mut().for_each(poison);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(poison),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_of_an_unknown_command_is_refused_clearly_and_the_node_lives() {
    let dir = tempfile::tempdir().unwrap();
    let (node, url) = serve(dir.path(), 1).await;
    node.bootstrap_single().await.unwrap();
    let (index, _) = node.write_indexed(noop()).await.unwrap();
    // An append-entries request as a newer leader would send it, with a command this build
    // does not know.
    let entry = openraft::Entry::<nimbus_state::raft::TypeConfig> {
        log_id: openraft::LogId::new(openraft::CommittedLeaderId::new(9, 2), index + 1),
        payload: openraft::EntryPayload::Normal(noop()),
    };
    let req = openraft::raft::AppendEntriesRequest::<nimbus_state::raft::TypeConfig> {
        vote: openraft::Vote::new_committed(9, 2),
        prev_log_id: None,
        entries: vec![entry],
        leader_commit: None,
    };
    let mut body = serde_json::to_value(&req).unwrap();
    poison(&mut body);
    let resp = reqwest::Client::new()
        .post(format!("{url}/raft/append"))
        .bearer_auth(SECRET)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::UNPROCESSABLE_ENTITY);
    let text = resp.text().await.unwrap();
    assert!(text.contains("upgrade this server"), "{text}");
    // The node is unharmed: still the leader of term 1, still writing.
    let res = node.write(noop()).await.unwrap();
    assert_eq!(res, Ok(CommandOutput::None));
    node.shutdown().await;
}

/// A server that joins behind a long log of large (group-committed) entries catches up:
/// openraft cancels an append-entries RPC after the heartbeat interval (200 ms), so the
/// transport sends a byte-bounded prefix of a large batch and reports partial success instead
/// of resending one oversized request until it times out forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_catches_up_on_a_log_of_large_entries() {
    let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    let (n1, _) = serve(dirs[0].path(), 1).await;
    let (n2, u2) = serve(dirs[1].path(), 2).await;
    n1.bootstrap_single().await.unwrap();
    // 300 entries of 400 commands each: about 20 MB of log, far more than one append can
    // carry within 200 ms.
    for _ in 0..300 {
        let batch = CommandEnvelope {
            command: Command::Batch {
                commands: (0..400).map(|_| noop()).collect(),
            },
            ..noop()
        };
        n1.write(batch).await.unwrap().unwrap();
    }
    let joined = tokio::time::timeout(Duration::from_secs(60), n1.add_server(2, &u2)).await;
    assert!(
        matches!(joined, Ok(Ok(()))),
        "the new server did not catch up: {joined:?}"
    );
    let idx = n1.read_index().await.unwrap();
    n2.wait_applied(idx, Duration::from_secs(10)).await.unwrap();
    n1.shutdown().await;
    n2.shutdown().await;
}
