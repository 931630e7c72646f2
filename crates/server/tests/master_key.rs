//! The cluster master key on a real (in-process) server: created 0600 at bootstrap, secrets
//! stored sealed under it, and `rotate` re-wraps them so that the new key opens them and the
//! old one no longer does (and is forgotten).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nimbus_seal::MasterKey;
use nimbus_server::{Server, ServerConfig};
use nimbus_state::secrets::secret_aad;

fn config(dir: &std::path::Path) -> ServerConfig {
    ServerConfig {
        data_dir: dir.to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        advertise_url: String::new(),
        node_id: 1,
        heartbeat_grace: Duration::from_secs(10),
        body_limit: 1 << 20,
        network_pool: "10.231.0.0/16".into(),
        net_prefix: "nbmk".into(),
        master_key_file: None,
        tls: nimbus_server::identity::TlsSettings::default(),
    }
}

/// The admin token `Server::start` created (the server itself keeps only its hash).
fn admin_token(server: &Server) -> String {
    std::fs::read_to_string(server.app.cfg.data_dir.join("admin.token"))
        .unwrap()
        .trim()
        .to_owned()
}

async fn create_secret(server: &Server, name: &str, value: &[u8]) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!(
            "http://{}/v1/projects/default/secrets",
            server.local_addr
        ))
        .bearer_auth(admin_token(server))
        .json(&serde_json::json!({
            "name": name,
            "data": nimbus_api::secret::encode(value),
        }))
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_rewraps_every_secret_and_forgets_the_old_key() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    let server = Server::start(config(&dir)).await.unwrap();
    let key_file = dir.join("master.key");
    let meta = std::fs::metadata(&key_file).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(meta.len(), 32);
    let old = MasterKey::from_file(&key_file).unwrap();

    for (name, value) in [("a", &b"value-a"[..]), ("b", b"value-b")] {
        let r = create_secret(&server, name, value).await;
        assert_eq!(r.status(), 201, "{:?}", r.text().await);
    }
    // Over the limit: 413 with a JSON error, nothing stored.
    let r = create_secret(&server, "big", &vec![1u8; 64 * 1024 + 1]).await;
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "payload_too_large");
    assert!(server.app.read(|s| !s.secrets.contains_key("default/big")));

    let sealed_before = server.app.read(|s| s.secrets.clone());
    assert_eq!(sealed_before.len(), 2);
    for (k, s) in &sealed_before {
        let name = k.split('/').nth(1).unwrap();
        assert_eq!(s.sealed.key_id, old.key_id());
        assert!(old.open(&s.sealed, &secret_aad("default", name)).is_ok());
    }

    let r = nimbus_server::masterkey::rotate(&server.app).await.unwrap();
    assert_eq!(r.old_key_id, old.key_id());
    assert_eq!(r.rewrapped, 2);

    let new = MasterKey::from_file(&key_file).unwrap();
    assert_eq!(new.key_id(), r.new_key_id);
    assert_ne!(new.key_id(), old.key_id());
    assert!(!dir.join("master.key.old").exists());
    assert!(!dir.join("master.key.next").exists());
    assert!(server.app.keys.get(old.key_id()).is_none(), "old key kept");
    let after = server.app.read(|s| s.secrets.clone());
    for (k, s) in &after {
        let name = k.split('/').nth(1).unwrap();
        let aad = secret_aad("default", name);
        assert_eq!(s.sealed.key_id, new.key_id());
        assert_eq!(s.secret.key_id, new.key_id());
        assert!(
            old.open(&s.sealed, &aad).is_err(),
            "old key still opens {k}"
        );
        let want = format!("value-{name}");
        assert_eq!(
            new.open(&s.sealed, &aad).unwrap().as_slice(),
            want.as_bytes()
        );
        assert_eq!(
            server.app.keys.open(&s.sealed, &aad).unwrap().as_slice(),
            want.as_bytes()
        );
    }
    // New secrets are sealed with the new key.
    assert_eq!(create_secret(&server, "c", b"value-c").await.status(), 201);
    assert_eq!(
        server
            .app
            .read(|s| s.secrets["default/c"].sealed.key_id.clone()),
        new.key_id()
    );
    server.shutdown().await;

    // A restarted server loads the rotated key and still opens everything.
    let server = Server::start(config(&dir)).await.unwrap();
    let all = server.app.read(|s| s.secrets.clone());
    for (k, s) in &all {
        let name = k.split('/').nth(1).unwrap();
        assert!(server
            .app
            .keys
            .open(&s.sealed, &secret_aad("default", name))
            .is_ok());
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_key_file_with_wrong_mode_or_another_key_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    let given = tmp.path().join("given.key");
    MasterKey::generate().write_new(&given).unwrap();
    // Installed from --master-key-file when the data dir has none.
    let keys = nimbus_server::masterkey::MasterKeys::load(&dir, Some(&given)).unwrap();
    assert_eq!(
        keys.current().unwrap().key_id(),
        MasterKey::from_file(&given).unwrap().key_id()
    );
    // Another key than the data dir's: refused.
    let other = tmp.path().join("other.key");
    MasterKey::generate().write_new(&other).unwrap();
    let e = nimbus_server::masterkey::MasterKeys::load(&dir, Some(&other)).unwrap_err();
    assert!(e.contains("--master-key-file"), "{e}");
    // A readable key file: refused.
    std::fs::set_permissions(
        dir.join("master.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let e = nimbus_server::masterkey::MasterKeys::load(&dir, None).unwrap_err();
    assert!(e.contains("0644"), "{e}");
}

/// A second data dir sharing the first's tokens and cluster secret.
fn member_dir(first: &std::path::Path, dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("NIMBUS_DATA_DIR"), "nimbus-data-v1\n").unwrap();
    for f in ["admin.token", "node.token", "cluster.secret"] {
        std::fs::copy(first.join(f), dir.join(f)).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_server_receives_the_key_and_a_rotation_reaches_it() {
    let tmp = tempfile::tempdir().unwrap();
    let d1 = tmp.path().join("s1");
    let s1 = Server::start(config(&d1)).await.unwrap();
    let url1 = format!("http://{}", s1.local_addr);
    let d2 = tmp.path().join("s2");
    member_dir(&d1, &d2);
    let mut cfg2 = config(&d2);
    cfg2.node_id = 2;
    let s2 = Server::start_with(
        cfg2,
        nimbus_server::ClusterOptions {
            join: vec![url1],
            ..nimbus_server::ClusterOptions::default()
        },
    )
    .await
    .unwrap();
    let key1 = MasterKey::from_file(&d1.join("master.key")).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !s2.app.keys.present() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the joining server never got the master key"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key2 = MasterKey::from_file(&d2.join("master.key")).unwrap();
    assert_eq!(key2.key_id(), key1.key_id());
    let mode = std::fs::metadata(d2.join("master.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A secret created through the first server opens on the second.
    assert_eq!(
        create_secret(&s1, "shared", b"value-shared").await.status(),
        201
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let sealed = loop {
        if let Some(s) = s2.app.read(|s| s.secrets.get("default/shared").cloned()) {
            break s.sealed;
        }
        assert!(tokio::time::Instant::now() < deadline, "not replicated");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let aad = secret_aad("default", "shared");
    assert_eq!(
        s2.app.keys.open(&sealed, &aad).unwrap().as_slice(),
        b"value-shared"
    );

    // A rotation on the first server reaches the second.
    let r = nimbus_server::masterkey::rotate(&s1.app).await.unwrap();
    assert_eq!(r.servers, 2);
    let on2 = MasterKey::from_file(&d2.join("master.key")).unwrap();
    assert_eq!(on2.key_id(), r.new_key_id);
    assert!(s2.app.keys.get(&r.old_key_id).is_none());
    let sealed = s2.app.read(|s| s.secrets["default/shared"].sealed.clone());
    assert_eq!(sealed.key_id, r.new_key_id);
    assert_eq!(
        s2.app.keys.open(&sealed, &aad).unwrap().as_slice(),
        b"value-shared"
    );
    s2.shutdown().await;
    s1.shutdown().await;
}
