//! Server <-> server mTLS: three `nimbus server`s over TLS, each in its own network namespace
//! (`testkit::netns`); the first forms the cluster, the others join it (`--join`, trusting
//! the CA by `--ca` file and by `--ca-fingerprint`), take over the CA and the master key, and
//! speak Raft, forwarding and joins over mTLS with server certificates.

use std::path::Path;
use std::time::{Duration, Instant};

use nimbus_testkit::netns::{self, Net};
use nimbus_testkit::require;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

/// A raw HTTPS client trusting the cluster CA, presenting `cert` (chain, key) if given.
fn https(net: &Net, cert: Option<(&str, &str)>) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(net.tls_config(cert))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// `POST {url}/raft/read-index` (harmless: a follower's read barrier) with the cluster
/// secret: the HTTP status, or the transport error.
async fn read_index(client: &reqwest::Client, url: &str, secret: &str) -> Result<u16, String> {
    client
        .post(format!("{url}/raft/read-index"))
        .bearer_auth(secret)
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_tls_servers_join_forward_fail_over_and_keep_raft_to_server_certificates() {
    if !require("root, ip, tc and nft (netns harness)", netns::available()) {
        return;
    }
    let mut net = Net::new(bin(), 3).expect("netns hosts").with_tls();
    net.start_tls_servers(&[]).await.expect("start servers");
    let leader = net
        .wait_cluster(&[0, 1, 2], 3, Duration::from_secs(60))
        .await
        .expect("TLS cluster formed");

    // Every server took over the same CA (its key sealed) and master key.
    let ca = net.ca_pem();
    let key0 = std::fs::read(net.hosts[0].data_dir.join("master.key")).unwrap();
    for h in &net.hosts[1..] {
        assert_eq!(std::fs::read_to_string(h.ca_file()).unwrap(), ca);
        assert_eq!(std::fs::read(h.data_dir.join("master.key")).unwrap(), key0);
        let sealed = std::fs::read_to_string(h.data_dir.join("pki/ca.key.sealed")).unwrap();
        assert!(!sealed.contains("PRIVATE KEY"), "the CA key is sealed");
    }

    // A write through a follower is forwarded to the leader and readable everywhere.
    let follower = (0..3).find(|&i| i != leader).unwrap();
    net.client(follower)
        .create_project("via-follower")
        .await
        .expect("write through a follower");
    for i in 0..3 {
        let all = net.client(i).list_projects().await.expect("list");
        assert!(
            all.iter().any(|p| p.meta.name == "via-follower"),
            "host {i} does not see the forwarded write"
        );
    }

    // An agent joins through a server that joined the cluster (every server issues).
    let joined = (0..3).find(|&i| i != 0 && i != leader).unwrap_or(2);
    let token = net
        .client(0)
        .create_join_token(300)
        .await
        .expect("join token");
    let id = nimbus_pki::Identity::new(nimbus_pki::Role::Agent, "a1");
    let (agent_key, csr) = nimbus_pki::new_key_and_csr(&id).unwrap();
    let issued = net
        .client(joined)
        .join_node(&nimbus_api::pki::NodeJoinRequest {
            join_token: token.token,
            name: "a1".into(),
            csr,
        })
        .await
        .expect("an agent joins through a joined server");
    let agent_chain = format!("{}{}", issued.cert_pem, issued.ca_pem);

    // The Raft endpoint takes only server certificates, whatever the bearer.
    let secret = std::fs::read_to_string(&net.cluster_secret_file).unwrap();
    let secret = secret.trim();
    let url = net.hosts[leader].url();
    let plain_url = url.replace("https://", "http://");
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let res = read_index(&plain, &plain_url, secret).await;
    assert!(res.is_err(), "a plain-HTTP client reached Raft: {res:?}");
    let res = read_index(&https(&net, None), &url, secret).await;
    assert_eq!(res, Ok(401), "no client certificate");
    let agent = https(&net, Some((&agent_chain, &agent_key)));
    let res = read_index(&agent, &url, secret).await;
    assert_eq!(res, Ok(403), "an agent certificate");
    let res = agent
        .get(format!("{url}/raft/master-key"))
        .bearer_auth(secret)
        .send()
        .await
        .map(|res| res.status().as_u16());
    assert_eq!(
        res.ok(),
        Some(403),
        "an agent certificate asked for the master key"
    );
    // A server certificate (issued for the cluster secret and a CSR) is let through.
    let sid = nimbus_pki::Identity::new(nimbus_pki::Role::Server, "server-test");
    let (server_key, csr) = nimbus_pki::new_key_and_csr(&sid).unwrap();
    let resp = https(&net, None)
        .post(format!("{url}/raft/pki/join"))
        .bearer_auth(secret)
        .json(&serde_json::json!({"node_id": 0xbeef, "csr": csr}))
        .send()
        .await
        .expect("server join");
    assert_eq!(resp.status().as_u16(), 200);
    let server_cert: nimbus_api::pki::IssuedCert = resp.json().await.unwrap();
    let server = https(
        &net,
        Some((
            &format!("{}{}", server_cert.cert_pem, server_cert.ca_pem),
            &server_key,
        )),
    );
    assert_eq!(read_index(&server, &url, secret).await, Ok(200));
    // ... but not without the cluster secret.
    assert_eq!(read_index(&server, &url, "wrong").await, Ok(401));

    // A master-key rotation reaches every server over mTLS, and the leader re-seals the CA
    // key in the replicated state under the new key (what a later joiner takes over).
    let resp = https(&net, None)
        .post(format!("{url}/v1/cluster/master-key/rotate"))
        .bearer_auth(&net.admin_token)
        .send()
        .await
        .expect("rotate");
    assert_eq!(resp.status().as_u16(), 200);
    let rotated: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(rotated["servers"], 3, "{rotated}");
    let new_key = rotated["new_key_id"].clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ca: serde_json::Value = server
            .get(format!("{url}/raft/pki/ca"))
            .bearer_auth(secret)
            .send()
            .await
            .expect("CA")
            .json()
            .await
            .expect("CA JSON");
        if ca["key_sealed"]["key_id"] == new_key {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the CA key in the state is still sealed by {}",
            ca["key_sealed"]["key_id"]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let key = std::fs::read(net.hosts[0].data_dir.join("master.key")).unwrap();
    assert_ne!(key, key0);
    for h in &net.hosts[1..] {
        assert_eq!(std::fs::read(h.data_dir.join("master.key")).unwrap(), key);
    }

    // kill -9 of the leader: a write through another server succeeds within 10 s, and the
    // killed server (restarted from its data dir: no join, its own CA copy) rejoins.
    let since = Instant::now();
    net.kill9(leader);
    let mut attempt = 0;
    loop {
        attempt += 1;
        let i = (leader + 1 + attempt % 2) % 3;
        let c = net.client(i).with_timeout(Duration::from_secs(2));
        if c.create_project(&format!("after-kill-{attempt}"))
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            since.elapsed() < Duration::from_secs(10),
            "no write within 10 s of killing the leader\n{}",
            net.logs_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!(
        "first write after kill -9 of the leader: {:?}",
        since.elapsed()
    );
    net.start_server(leader).expect("restart");
    net.wait_cluster(&[0, 1, 2], 3, Duration::from_secs(30))
        .await
        .expect("cluster whole again");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen = net.client(leader).list_projects().await.unwrap_or_default();
        if seen.iter().any(|p| p.meta.name.starts_with("after-kill-")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the restarted server did not catch up\n{}",
            net.logs_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `nimbus server --join <host 0>` on host 1 with `extra`; returns its exit status and
/// log once it exits (it must, within 30 s).
async fn failing_join(net: &Net, name: &str, extra: &[&str]) -> (bool, String) {
    let h = &net.hosts[1];
    let mut args: Vec<String> = vec![
        "server".into(),
        "--data-dir".into(),
        h.data_dir.with_extension(name).display().to_string(),
        "--listen".into(),
        format!("{}:{}", h.addr, netns::PORT),
        "--advertise".into(),
        h.url(),
        "--join".into(),
        net.hosts[0].url(),
    ];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let mut child = net
        .spawn_in(1, name, &bin().display().to_string(), &args)
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name}: the server kept trying to join");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = std::fs::read_to_string(h.data_dir.with_extension(format!("{name}.log")))
        .unwrap_or_default();
    (status.success(), log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_tls_join_refuses_another_ca_and_needs_the_cluster_secret() {
    if !require("root, ip, tc and nft (netns harness)", netns::available()) {
        return;
    }
    let mut net = Net::new(bin(), 2).expect("netns hosts").with_tls();
    net.start_tls_first(&[]).await.expect("start 0");
    net.wait_cluster(&[0], 1, Duration::from_secs(60))
        .await
        .expect("cluster");
    let secret = net.cluster_secret_file.display().to_string();
    let wrong_fp = format!("sha256:{}", "0".repeat(64));
    let (ok, log) = failing_join(
        &net,
        "other-ca",
        &[
            "--cluster-secret-file",
            &secret,
            "--ca-fingerprint",
            &wrong_fp,
        ],
    )
    .await;
    assert!(!ok && log.contains("refusing to join"), "{log}");
    // No CA given: refused, naming the fingerprint to check.
    let (ok, log) = failing_join(&net, "no-ca", &["--cluster-secret-file", &secret]).await;
    assert!(!ok && log.contains("--ca-fingerprint sha256:"), "{log}");
    // The right CA but the node token as cluster secret: no server certificate.
    let ca = net.hosts[0].ca_file().display().to_string();
    let node_token = net.node_token_file.display().to_string();
    let (ok, log) = failing_join(
        &net,
        "intruder",
        &["--cluster-secret-file", &node_token, "--ca", &ca],
    )
    .await;
    assert!(
        !ok && log.contains("refused this server's cluster secret"),
        "{log}"
    );
    let info = net.client(0).cluster_info().await.expect("info");
    assert_eq!(info.members.len(), 1, "{info:?}");

    // `nimbus server join URL` of a running TLS server with its own CA: refused, saying how
    // to start it instead.
    net.start_servers_with(1, &["--bootstrap-expect", "1"])
        .expect("start 1");
    let own_ca = nimbus_testkit::eventually(Duration::from_secs(30), || async {
        std::fs::read_to_string(net.hosts[1].ca_file()).ok()
    })
    .await
    .expect("host 1's own CA");
    assert_ne!(own_ca, net.ca_pem());
    let out = std::process::Command::new(bin())
        .args(["server", "join", &net.hosts[1].url()])
        .env("NIMBUS_URL", net.hosts[0].url())
        .env("NIMBUS_TOKEN", &net.admin_token)
        .env("NIMBUS_CA", net.hosts[0].ca_file())
        .output()
        .expect("cli");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    let ours = net
        .client(0)
        .create_join_token(60)
        .await
        .unwrap()
        .ca_fingerprint;
    assert!(
        err.contains("has its own CA")
            && err.contains(&format!(
                "--join {} --ca-fingerprint {ours}",
                net.hosts[0].url()
            )),
        "{err}"
    );
    let info = net.client(0).cluster_info().await.expect("info");
    assert_eq!(info.members.len(), 1, "{info:?}");
}

/// A child process killed when dropped (also when the test fails).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--bootstrap-expect 3` over TLS: three servers that start without a CA settle on one (the
/// lowest node id's), the others take it and the master key over with certificates of it,
/// and the cluster forms over mTLS. A fourth server with another cluster secret, listed as a
/// peer, is not trusted: it gets nothing and the others do not count it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ha_tls_bootstrap_expect_settles_one_ca_for_the_cluster() {
    if !require("root, ip, tc and nft (netns harness)", netns::available()) {
        return;
    }
    let mut net = Net::new(bin(), 4).expect("netns hosts").with_tls();
    let peers = net.urls().join(",");
    let boot = ["--bootstrap-expect", "3", "--peers", peers.as_str()];
    // The intruder: host 3, another cluster secret.
    let other_secret = net.scratch().join("other.secret");
    std::fs::write(&other_secret, "f".repeat(64)).unwrap();
    let h3 = &net.hosts[3];
    let mut args: Vec<String> = vec![
        "server".into(),
        "--data-dir".into(),
        h3.data_dir.display().to_string(),
        "--listen".into(),
        format!("{}:{}", h3.addr, netns::PORT),
        "--advertise".into(),
        h3.url(),
        "--cluster-secret-file".into(),
        other_secret.display().to_string(),
    ];
    args.extend(boot.iter().map(|s| (*s).to_owned()));
    let mut intruder = Reaped(
        net.spawn_in(3, "intruder", &bin().display().to_string(), &args)
            .expect("spawn the intruder"),
    );
    // One server alone waits, and serves nothing in plain HTTP meanwhile.
    net.start_servers_with(0, &boot).expect("start 0");
    let waited = nimbus_testkit::eventually(Duration::from_secs(20), || async {
        net.log(0)
            .contains("waiting for 2 more servers (bootstrap-expect 3)")
            .then_some(())
    })
    .await;
    assert!(waited.is_some(), "no waiting message:\n{}", net.log(0));
    let plain = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let url0 = net.hosts[0].url().replace("https://", "http://");
    let res = plain.get(format!("{url0}/v1/cluster")).send().await;
    assert!(
        res.is_err(),
        "a plain-HTTP answer while bootstrapping: {res:?}"
    );
    let refused = nimbus_testkit::eventually(Duration::from_secs(15), || async {
        net.log(0)
            .contains("not authenticated by this server's cluster secret")
            .then_some(())
    })
    .await;
    assert!(refused.is_some(), "the intruder's hello:\n{}", net.log(0));
    for i in 1..3 {
        net.start_servers_with(i, &boot).expect("start");
    }
    let settled = nimbus_testkit::eventually(Duration::from_secs(30), || async {
        (0..3)
            .all(|i| net.hosts[i].ca_file().exists())
            .then_some(())
    })
    .await;
    assert!(settled.is_some(), "no cluster CA\n{}", net.logs_tail(20));
    let leader = net
        .wait_cluster(&[0, 1, 2], 3, Duration::from_secs(60))
        .await
        .expect("TLS cluster formed");

    // One CA and one master key; every server presents a server certificate of that CA
    // (the clients trust only it); the lowest id's CA it is.
    let ca = net.ca_pem();
    let key = std::fs::read(net.hosts[0].data_dir.join("master.key")).unwrap();
    let info = net.client(leader).cluster_info().await.expect("info");
    let lowest = &info.members.iter().min_by_key(|m| m.id).unwrap().url;
    let lowest = net.hosts.iter().position(|h| &h.url() == lowest).unwrap();
    for i in 0..3 {
        let log = net.log(i);
        assert_eq!(
            log.contains("is the cluster CA"),
            i == lowest,
            "host {i} (lowest id: host {lowest}):\n{log}"
        );
    }
    for (i, h) in net.hosts[..3].iter().enumerate() {
        assert_eq!(
            std::fs::read_to_string(h.ca_file()).unwrap(),
            ca,
            "host {i}"
        );
        assert_eq!(
            std::fs::read(h.data_dir.join("master.key")).unwrap(),
            key,
            "host {i}"
        );
        let presented = nimbus_server::tlsboot::presented_ca(&h.url())
            .await
            .unwrap();
        assert_eq!(
            presented.trim(),
            ca.trim(),
            "host {i} presents a certificate of another CA"
        );
        net.client(i)
            .cluster_info()
            .await
            .expect("mTLS-verified API");
    }
    // A write through a follower is forwarded to the leader over mTLS.
    let follower = (0..3).find(|&i| i != leader).unwrap();
    net.client(follower)
        .create_project("booted")
        .await
        .expect("write through a follower");
    assert_eq!(info.members.len(), 3, "{info:?}");
    // A server restarted from its data dir (its CA copy there) rejoins at once, same CA.
    let other = (0..3).find(|&i| i != lowest).unwrap();
    net.kill9(other);
    net.start_server(other).expect("restart");
    net.wait_cluster(&[0, 1, 2], 3, Duration::from_secs(30))
        .await
        .expect("cluster whole again");
    let wrote = nimbus_testkit::eventually(Duration::from_secs(30), || async {
        net.client(other).create_project("after-restart").await.ok()
    })
    .await;
    assert!(
        wrote.is_some(),
        "no write through the restarted server\n{}",
        net.log(other)
    );
    assert_eq!(
        std::fs::read_to_string(net.hosts[other].ca_file()).unwrap(),
        ca
    );

    // The intruder got no CA, no master key, no membership; it is still waiting.
    assert!(
        intruder.0.try_wait().unwrap().is_none(),
        "the intruder exited"
    );
    drop(intruder);
    assert!(!net.hosts[3].ca_file().exists());
    assert!(!net.hosts[3].data_dir.join("master.key").exists());
    let log = std::fs::read_to_string(net.hosts[3].data_dir.with_extension("intruder.log"))
        .unwrap_or_default();
    assert!(log.contains("waiting for 2 more servers"), "{log}");
}
