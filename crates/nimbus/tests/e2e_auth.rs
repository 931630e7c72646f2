//! Identity and authorization on a fresh `nimbus up`: the node token every agent holds can
//! neither write through Raft nor take over a registered node; node credentials act only for
//! their node and die with it; the agent API takes only the servers' credential (and the
//! metrics token for `/metrics`); secrets at rest are hashes and the data dir is private.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nimbus_api::agent::{RegisterNodeRequest, RegisteredNode};
use nimbus_api::{Capacity, ErrorBody, NodeCapabilities};
use nimbus_testkit::{require, Cloud};
use reqwest::{Method, StatusCode};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

fn deps() -> bool {
    require("root", nix::unistd::geteuid().is_root())
}

fn read_token(cloud: &Cloud, file: &str) -> String {
    std::fs::read_to_string(cloud.data_dir.join(file))
        .unwrap_or_else(|e| panic!("{file}: {e}"))
        .trim()
        .to_owned()
}

/// `method url` with `Authorization: Bearer token` (if any) and a JSON body (if any).
async fn call(
    method: Method,
    url: &str,
    token: Option<&str>,
    body: Option<String>,
) -> (StatusCode, String) {
    let mut rb = reqwest::Client::new().request(method, url);
    if let Some(t) = token {
        rb = rb.header("authorization", format!("Bearer {t}"));
    }
    if let Some(b) = body {
        rb = rb.header("content-type", "application/json").body(b);
    }
    let resp = rb.send().await.expect("request");
    let status = resp.status();
    (status, resp.text().await.unwrap_or_default())
}

async fn node(c: &nimbus_client::Client, name: &str) -> nimbus_api::Node {
    c.list_nodes()
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.meta.name == name)
        .unwrap_or_else(|| panic!("no node {name}"))
}

fn error_of(body: &str) -> nimbus_api::ApiError {
    serde_json::from_str::<ErrorBody>(body)
        .unwrap_or_else(|e| panic!("not a JSON error ({e}): {body}"))
        .error
}

fn registration(
    name: &str,
    agent_url: &str,
    cpu_millis: u64,
    memory_bytes: u64,
) -> RegisterNodeRequest {
    RegisterNodeRequest {
        name: name.into(),
        agent_url: agent_url.into(),
        capacity: Capacity {
            cpu_millis,
            memory_bytes,
            disk_bytes: 1 << 30,
        },
        capabilities: NodeCapabilities::default(),
        zone: String::new(),
        labels: std::collections::BTreeMap::new(),
        agent_version: "test".into(),
        underlay_ip: String::new(),
    }
}

async fn register(cloud: &Cloud, token: &str, req: &RegisterNodeRequest) -> (StatusCode, String) {
    call(
        Method::POST,
        &format!("{}/v1/nodes", cloud.url),
        Some(token),
        Some(serde_json::to_string(req).unwrap()),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_token_cannot_write_through_raft() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let node_token = read_token(&cloud, "node.token");
    let admin_token = read_token(&cloud, "admin.token");
    let envelope = serde_json::json!({
        "format": 1,
        "time": "2026-01-01T00:00:00Z",
        "new_id": "00000000-0000-4000-8000-000000000001",
        "command": {"op": "create_project", "name": "evil", "description": ""},
    })
    .to_string();
    for (who, token) in [("node token", &node_token), ("admin token", &admin_token)] {
        let (status, body) = call(
            Method::POST,
            &format!("{}/raft/client-write", cloud.url),
            Some(token),
            Some(envelope.clone()),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{who}: {body}");
        let (status, _) = call(
            Method::POST,
            &format!("{}/raft/fleet/beats", cloud.url),
            Some(token),
            Some("[]".into()),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::UNAUTHORIZED,
            "{who} on /raft/fleet/beats"
        );
    }
    let projects = cloud.client().list_projects().await.unwrap();
    assert!(
        projects.iter().all(|p| p.meta.name != "evil"),
        "a project was created through Raft: {projects:?}"
    );
    // The servers' own secret is not the node token, and the server keeps it private.
    let secret = read_token(&cloud, "cluster.secret");
    assert_ne!(secret, node_token);
    assert_eq!(secret.len(), 64);
    // The node token may not read cluster membership (where the secret would help) either.
    let (status, _) = call(
        Method::GET,
        &format!("{}/v1/cluster", cloud.url),
        Some(&node_token),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_registration_is_validated_and_owned_by_the_node() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let node_token = read_token(&cloud, "node.token");
    let c = cloud.client();
    let node1 = node(&c, "node1").await;

    // Invalid registrations: a JSON error naming the field.
    for (req, field) in [
        (
            registration("bad1", "not a url", 1000, 1 << 30),
            "agent_url",
        ),
        (
            registration("bad2", "http://192.0.2.1:7444", 1_000_000_000, 1 << 30),
            "capacity.cpu_millis",
        ),
        (
            registration("bad3", "http://192.0.2.1:7444", 1000, 0),
            "capacity.memory_bytes",
        ),
        (
            registration("bad4", "http://192.0.2.1:7444", 1000, 65 << 40),
            "capacity.memory_bytes",
        ),
    ] {
        let (status, body) = register(&cloud, &node_token, &req).await;
        assert!(status.is_client_error(), "{field}: {status} {body}");
        let e = error_of(&body);
        assert_eq!(e.field.as_deref(), Some(field), "{body}");
    }
    // Another machine claiming node1's underlay address.
    assert!(!node1.underlay_ip.is_empty());
    let mut dup = registration("dup", "http://192.0.2.1:7444", 1000, 1 << 30);
    dup.underlay_ip.clone_from(&node1.underlay_ip);
    let (status, body) = register(&cloud, &node_token, &dup).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(error_of(&body).field.as_deref(), Some("underlay_ip"));

    // The node token cannot overwrite a registered node.
    let (status, body) = register(
        &cloud,
        &node_token,
        &registration("node1", "http://192.0.2.1:7444", 4_000_000, 4),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(error_of(&body).code.as_str(), "conflict");
    let after = node(&c, "node1").await;
    assert_eq!(after.capacity, node1.capacity);
    assert_eq!(after.agent_url, node1.agent_url);
    assert!(!after.cordoned);

    // A new node gets its own credential, once.
    let (status, body) = register(
        &cloud,
        &node_token,
        &registration("newbie", "http://192.0.2.1:7444", 1000, 1 << 30),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let reg: RegisteredNode = serde_json::from_str(&body).unwrap();
    let cred = reg.credential.expect("a credential for a new node");
    assert!(reg.agent_api_token.is_some());
    assert!(!body.contains(&node_token));

    let url = |p: &str| format!("{}{p}", cloud.url);
    let hb = Some("{}".to_owned());
    // The node token may no longer act for it; its credential may, for it only.
    let (status, _) = call(
        Method::POST,
        &url("/v1/nodes/newbie/heartbeat"),
        Some(&node_token),
        hb.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, body) = call(
        Method::POST,
        &url("/v1/nodes/newbie/heartbeat"),
        Some(&cred),
        hb.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
    for (method, path, body) in [
        (Method::POST, "/v1/nodes/node1/heartbeat", hb.clone()),
        (
            Method::POST,
            "/v1/nodes/node1/status",
            Some(r#"{"instances":[]}"#.to_owned()),
        ),
        (Method::GET, "/v1/nodes/node1/assignments?wait=0", None),
        (Method::POST, "/v1/nodes/newbie/drain", None),
        (Method::DELETE, "/v1/nodes/newbie", None),
        (Method::GET, "/v1/projects", None),
    ] {
        let (status, text) = call(method.clone(), &url(path), Some(&cred), body).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {text}");
    }
    let (status, body) = register(
        &cloud,
        &cred,
        &registration("node1", "http://192.0.2.1:7444", 1000, 1 << 30),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    // Re-registration with its credential: accepted, no new credential.
    let (status, body) = register(
        &cloud,
        &cred,
        &registration("newbie", "http://192.0.2.1:7445", 2000, 1 << 30),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let again: RegisteredNode = serde_json::from_str(&body).unwrap();
    assert_eq!(again.credential, None);
    assert_eq!(again.node.capacity.cpu_millis, 2000);

    // A hollow fleet (node token) cannot take over or act for real nodes.
    let fleet = serde_json::json!({"nodes": [registration("newbie", "http://192.0.2.1:7444", 1000, 1 << 30)]});
    let (status, body) = call(
        Method::POST,
        &url("/v1/fleet/register"),
        Some(&node_token),
        Some(fleet.to_string()),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(
        body.contains("newbie"),
        "the fleet registration of a real node was not refused: {body}"
    );
    let (status, body) = call(
        Method::POST,
        &url("/v1/fleet/heartbeats"),
        Some(&node_token),
        Some(r#"{"nodes":["node1"]}"#.into()),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");

    // Removal: admin only; the credential stops working at once.
    let out = cloud
        .cli()
        .args(["node", "remove", "newbie"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (status, _) = call(
        Method::POST,
        &url("/v1/nodes/newbie/heartbeat"),
        Some(&cred),
        hb.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = register(
        &cloud,
        &cred,
        &registration("newbie", "http://192.0.2.1:7444", 1000, 1 << 30),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(c
        .list_nodes()
        .await
        .unwrap()
        .iter()
        .all(|n| n.meta.name != "newbie"));
    // Removing what does not exist: 404 through the CLI's error.
    let out = cloud
        .cli()
        .args(["node", "remove", "newbie"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_api_takes_only_the_servers_credential() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let node_token = read_token(&cloud, "node.token");
    let admin_token = read_token(&cloud, "admin.token");
    let metrics_token = read_token(&cloud, "metrics.token");
    let node1 = node(&cloud.client(), "node1").await;
    let agent = node1.agent_url.trim_end_matches('/').to_owned();
    let saved: serde_json::Value = serde_json::from_slice(
        &std::fs::read(cloud.data_dir.join("agent/node.credential")).expect("node.credential"),
    )
    .unwrap();
    let server_token = saved["agent_api_token"].as_str().unwrap().to_owned();

    let (status, body) = call(Method::GET, &format!("{agent}/agent/healthz"), None, None).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "ok"));
    for token in [None, Some(node_token.as_str()), Some(admin_token.as_str())] {
        let (status, _) = call(Method::GET, &format!("{agent}/metrics"), token, None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "metrics with {token:?}");
        let (status, _) = call(
            Method::POST,
            &format!("{agent}/agent/v1/instances/nope/exec"),
            token,
            Some(r#"{"command":["true"]}"#.into()),
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "exec with {token:?}");
        let (status, _) = call(
            Method::GET,
            &format!("{agent}/agent/v1/instances/nope/logs"),
            token,
            None,
        )
        .await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "logs with {token:?}");
    }
    for token in [&metrics_token, &server_token] {
        let (status, _) = call(Method::GET, &format!("{agent}/metrics"), Some(token), None).await;
        assert_eq!(status, StatusCode::OK);
    }
    // The metrics token is for metrics only; the servers' credential passes (to a 404: no
    // such instance).
    let (status, _) = call(
        Method::POST,
        &format!("{agent}/agent/v1/instances/nope/exec"),
        Some(&metrics_token),
        Some(r#"{"command":["true"]}"#.into()),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, body) = call(
        Method::POST,
        &format!("{agent}/agent/v1/instances/nope/exec"),
        Some(&server_token),
        Some(r#"{"command":["true"]}"#.into()),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_at_rest_are_hashes_and_the_data_dir_is_private() {
    if !deps() {
        return;
    }
    let mut cloud = Cloud::start(bin()).expect("nimbus up");
    // Every directory 0700, every file 0600, raft.redb included.
    let mut seen = 0;
    let mut wrong = Vec::new();
    let mut stack = vec![cloud.data_dir.clone()];
    while let Some(dir) = stack.pop() {
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        if meta.permissions().mode() & 0o777 != 0o700 {
            wrong.push(format!(
                "{} {:o}",
                dir.display(),
                meta.permissions().mode() & 0o777
            ));
        }
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                seen += 1;
                if m.permissions().mode() & 0o777 != 0o600 {
                    wrong.push(format!(
                        "{} {:o}",
                        e.path().display(),
                        m.permissions().mode() & 0o777
                    ));
                }
            }
        }
    }
    assert!(seen >= 5, "only {seen} files in the data dir");
    assert!(cloud.data_dir.join("raft/raft.redb").exists() || seen > 0);
    assert!(wrong.is_empty(), "not private: {wrong:#?}");

    // The server keeps hashes: it goes on accepting the token it created even when the plain
    // file (the CLI's copy) says something else, and never the file's new content.
    let admin = read_token(&cloud, "admin.token");
    let hash = read_token(&cloud, "admin.token.sha256");
    assert_eq!(hash, nimbus_server::auth::token_hash_hex(&admin));
    std::fs::write(cloud.data_dir.join("admin.token"), "f".repeat(64)).unwrap();
    cloud.restart().expect("restart");
    let projects = format!("{}/v1/projects", cloud.url);
    let (status, _) = call(Method::GET, &projects, Some(&admin), None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = call(Method::GET, &projects, Some(&"f".repeat(64)), None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // The bearer scheme is case-insensitive (RFC 7235).
    let resp = reqwest::Client::new()
        .get(&projects)
        .header("authorization", format!("bearer {admin}"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    std::fs::write(cloud.data_dir.join("admin.token"), &admin).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_stays_removed_until_it_registers_anew() {
    if !deps() {
        return;
    }
    let mut cloud = Cloud::start(bin()).expect("nimbus up");
    cloud.add_agent("node2").expect("second agent");
    let agent_dir = cloud.data_dir.with_file_name("agent-node2");
    let saved = agent_dir.join("node.credential");
    let mode = std::fs::metadata(&saved)
        .expect("node.credential")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let c = cloud.client();
    assert!(c
        .list_nodes()
        .await
        .unwrap()
        .iter()
        .any(|n| n.meta.name == "node2"));

    // The node token cannot take its name over while it is registered.
    let node_token = read_token(&cloud, "node.token");
    let (status, _) = register(
        &cloud,
        &node_token,
        &registration("node2", "http://192.0.2.1:7444", 1000, 1 << 30),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);

    let out = cloud
        .cli()
        .args(["node", "remove", "node2"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Its agent keeps running, but its heartbeats (every 2 s) no longer bring it back.
    tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    assert!(c
        .list_nodes()
        .await
        .unwrap()
        .iter()
        .all(|n| n.meta.name != "node2"));
    // Restarted, it says why it cannot register...
    let err = cloud
        .restart_agent("node2")
        .expect_err("a removed node must not register with its old credential");
    assert!(
        err.to_string()
            .contains("no longer accepts this node's credential"),
        "{err}"
    );
    // ...and registers anew once its credential is gone.
    std::fs::remove_file(&saved).unwrap();
    cloud.restart_agent("node2").expect("registers anew");
    assert!(c
        .list_nodes()
        .await
        .unwrap()
        .iter()
        .any(|n| n.meta.name == "node2"));
}
