//! End to end over TLS: `nimbus server` with its internal CA, agents joining with one-time
//! join tokens and authenticating with their certificates (mTLS both ways), certificate
//! rotation under load, revocation, and the refusals (foreign CA, expired certificate,
//! reused or expired token).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nimbus_api::pki::{IssuedCert, NodeJoinRequest};
use nimbus_api::{ErrorCode, NodeState};
use nimbus_client::{Client, ClientError};
use nimbus_pki::{Ca, Identity, Role};
use nimbus_testkit::tls::TlsCloud;
use nimbus_testkit::{eventually, have, http_get, require};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

fn deps() -> bool {
    require("root", nix::unistd::geteuid().is_root())
        && require("runc", have("runc"))
        && require("/bin/busybox", Path::new("/bin/busybox").exists())
}

/// The cluster CA with its key, read from the server's data dir (tests sign odd certificates
/// with it).
fn cluster_ca(cloud: &TlsCloud) -> Ca {
    let master =
        nimbus_seal::MasterKey::from_file(&cloud.data_dir.join("master.key")).expect("master.key");
    let sealed: nimbus_seal::Sealed = serde_json::from_str(
        &std::fs::read_to_string(cloud.data_dir.join("pki/ca.key.sealed")).expect("ca.key.sealed"),
    )
    .expect("sealed CA key");
    let key = master
        .open(&sealed, b"nimbus-ca-key")
        .expect("opens with the master key");
    Ca::from_pem(&cloud.ca_pem(), std::str::from_utf8(&key).unwrap()).expect("CA")
}

/// A certificate for `id` signed by `ca`, valid between the two times: (chain PEM, key PEM).
fn signed(ca: &Ca, id: &Identity, from: SystemTime, to: SystemTime) -> (String, String) {
    let (key, csr) = nimbus_pki::new_key_and_csr(id).unwrap();
    let c = ca.issue_between(&csr, id, from, to, &[], &[]).unwrap();
    (format!("{}{}", c.cert_pem, ca.cert_pem()), key)
}

fn valid_for_an_hour(ca: &Ca, id: &Identity) -> (String, String) {
    let now = SystemTime::now();
    signed(
        ca,
        id,
        now - Duration::from_secs(60),
        now + Duration::from_secs(3600),
    )
}

/// Joins `name` through the API with `token`: (chain PEM, key PEM) or the refusal.
async fn join(cloud: &TlsCloud, token: &str, name: &str) -> Result<(String, String), ClientError> {
    let id = Identity::new(Role::Agent, name);
    let (key, csr) = nimbus_pki::new_key_and_csr(&id).unwrap();
    let anon = Client::new(&cloud.url, "", "default").with_tls(cloud.tls_config(None));
    let IssuedCert {
        cert_pem, ca_pem, ..
    } = anon
        .join_node(&NodeJoinRequest {
            join_token: token.into(),
            name: name.into(),
            csr,
        })
        .await?;
    Ok((format!("{cert_pem}{ca_pem}"), key))
}

/// An HTTP client presenting `cert` (chain, key) and trusting the cluster CA.
fn mtls(cloud: &TlsCloud, cert: (&str, &str)) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(cloud.tls_config(Some(cert)))
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// `POST /v1/pki/renew` with a client certificate: the HTTP status, or the transport error.
async fn renew(cloud: &TlsCloud, http: &reqwest::Client, name: &str) -> Result<u16, String> {
    let (_, csr) = nimbus_pki::new_key_and_csr(&Identity::new(Role::Agent, name)).unwrap();
    http.post(format!("{}/v1/pki/renew", cloud.url))
        .json(&nimbus_api::pki::RenewRequest { csr })
        .send()
        .await
        .map(|r| r.status().as_u16())
        .map_err(|e| format!("{e:?}"))
}

fn ca_fingerprint(cloud: &TlsCloud) -> String {
    let der = nimbus_pki::certs_from_pem(&cloud.ca_pem()).unwrap();
    nimbus_pki::fingerprint(&der[0])
}

/// A request refused before its body is read still gets its answer, also while the client is
/// sending megabytes of body (the server's socket lingers instead of resetting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_with_a_large_body_gets_its_answer() {
    let cloud = TlsCloud::start(bin(), &[]).expect("nimbus server");
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(cloud.tls_config(None))
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let body = vec![b'a'; 4 << 20];
    let mut errors = Vec::new();
    for _ in 0..20 {
        match http
            .patch(format!("{}/v1/projects/default/loadbalancers/x", cloud.url))
            .bearer_auth("not-a-token")
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
        {
            Ok(r) => assert_eq!(r.status().as_u16(), 401),
            Err(e) => errors.push(format!("{e:?}")),
        }
    }
    assert!(errors.is_empty(), "{} of 20: {errors:?}", errors.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_over_tls_with_the_ca_pinned() {
    let cloud = TlsCloud::start(bin(), &[]).expect("nimbus server");
    let home = tempfile::tempdir().unwrap();

    // Without --ca and without a terminal the CLI refuses the unknown CA, printing its
    // fingerprint (what an operator compares).
    let out = cloud
        .cli()
        .env_remove("NIMBUS_CA")
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .args(["node", "list"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an unknown CA must be refused: {err}"
    );
    assert!(
        err.contains(&ca_fingerprint(&cloud)),
        "the fingerprint must be shown: {err}"
    );

    // At a terminal the CLI shows the fingerprint and asks; the answer pins the CA, and later
    // runs (without a terminal) trust it.
    if require("script (util-linux)", have("script")) {
        use std::io::Write;
        let mut child = std::process::Command::new("script")
            .args([
                "-qec",
                &format!("{} project list", bin().display()),
                "/dev/null",
            ])
            .env("NIMBUS_URL", &cloud.url)
            .env("NIMBUS_TOKEN", &cloud.token)
            .env("HOME", home.path())
            .env_remove("NIMBUS_CA")
            .env_remove("XDG_CONFIG_HOME")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"y\n").unwrap();
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains(&ca_fingerprint(&cloud)),
            "the prompt shows the fingerprint: {text}"
        );
        assert!(
            text.contains("default"),
            "after pinning the command runs: {text}"
        );
        let known = std::fs::read_to_string(home.path().join(".config/nimbus/known_cas")).unwrap();
        assert!(known.contains(&ca_fingerprint(&cloud)), "{known}");
        let out = cloud
            .cli()
            .env_remove("NIMBUS_CA")
            .env("HOME", home.path())
            .env_remove("XDG_CONFIG_HOME")
            .args(["project", "list"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pinned: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // The CA key is on disk only sealed under the master key.
    for e in std::fs::read_dir(cloud.data_dir.join("pki")).unwrap() {
        let e = e.unwrap();
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        assert!(
            !text.contains("PRIVATE KEY"),
            "{} holds a plain private key",
            e.path().display()
        );
    }
    assert!(cloud.data_dir.join("pki/ca.key.sealed").exists());

    // With the CA pinned (--ca / NIMBUS_CA) the CLI works.
    let out = cloud.cli().args(["project", "list"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("default"));

    // The typed client over TLS 1.3 (its config allows nothing else).
    let c = cloud.client();
    assert_eq!(c.health().await.unwrap().status, "ok");
    assert!(c
        .list_projects()
        .await
        .unwrap()
        .iter()
        .any(|p| p.meta.name == "default"));

    // Nothing answers in plain text on the API port.
    let plain = reqwest::Client::new()
        .get(format!(
            "http://127.0.0.1:{}/healthz",
            cloud.url.rsplit(':').next().unwrap()
        ))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP must not be served: {plain:?}");

    // A client that trusts another CA refuses the server.
    let foreign = Ca::generate("foreign").unwrap();
    let roots = nimbus_pki::verify::roots(foreign.cert_pem()).unwrap();
    let v = nimbus_pki::ClusterServerVerifier::new(
        roots,
        vec![Role::Server],
        Arc::new(nimbus_pki::NoRevocation),
    );
    let cfg = nimbus_pki::client_config(Arc::new(v), None).unwrap();
    let wrong = Client::new(&cloud.url, &cloud.token, "default").with_tls(cfg);
    assert!(matches!(
        wrong.health().await,
        Err(ClientError::Connect { .. })
    ));

    // The CA certificate, with the content type the spec documents.
    let r = reqwest::Client::builder()
        .use_preconfigured_tls(cloud.tls_config(None))
        .build()
        .unwrap()
        .get(format!("{}/v1/pki/ca", cloud.url))
        .bearer_auth(&cloud.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "application/x-pem-file");
    assert_eq!(r.text().await.unwrap(), cloud.ca_pem());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_joins_with_a_join_token_and_serves_instances() {
    if !deps() {
        return;
    }
    let mut cloud = TlsCloud::start(bin(), &[]).expect("nimbus server");
    let token = cloud.join_token("1h").expect("join token");
    assert_eq!(token.len(), 64, "a 256-bit token: {token}");
    cloud.join_agent("n1", Some(&token)).expect("agent joins");
    let c = cloud.client();
    let node = eventually(Duration::from_secs(30), || async {
        c.list_nodes().await.ok().and_then(|n| {
            n.into_iter()
                .find(|n| n.meta.name == "n1" && n.state == NodeState::Ready)
        })
    })
    .await
    .expect("n1 ready");
    assert!(
        node.agent_url.starts_with("https://"),
        "the agent API is TLS: {}",
        node.agent_url
    );
    let key = cloud.agent_dir("n1").join("pki/node.key");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&key).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    assert!(
        !cloud.agent_log("n1").contains("node.token"),
        "the joined agent has no node token"
    );

    // A container on the joined node answers; exec reaches the agent over mTLS.
    let out = cloud
        .cli()
        .args([
            "launch", "busybox", "web", "--memory", "64M", "--", "httpd", "-f", "-p", "8080", "-h",
            "/var/www",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "launch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let web = c.get_instance("web").await.unwrap();
    assert_eq!(web.status.node.as_deref(), Some("n1"));
    let ip = web.status.ip.clone().expect("ip");
    let out = cloud
        .cli()
        .args([
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            "echo hello-over-mtls > /var/www/index.html",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "exec over mTLS: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = eventually(Duration::from_secs(10), || async {
        http_get(&ip, 8080).filter(|p| p.contains("hello-over-mtls"))
    })
    .await;
    assert!(
        page.is_some(),
        "httpd on the joined node must answer on {ip}:8080"
    );

    // The agent API accepts only server certificates of the cluster CA.
    let ca = cluster_ca(&cloud);
    let roots = nimbus_pki::verify::roots(&cloud.ca_pem()).unwrap();
    let to_agent = |cert: Option<(String, String)>| {
        let v = nimbus_pki::ClusterServerVerifier::new(
            roots.clone(),
            vec![Role::Agent],
            Arc::new(nimbus_pki::NoRevocation),
        );
        let store = cert.map(|(c, k)| Arc::new(nimbus_pki::CertStore::new(&c, &k).unwrap()));
        reqwest::Client::builder()
            .use_preconfigured_tls(nimbus_pki::client_config(Arc::new(v), store).unwrap())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    };
    let health = format!("{}/agent/healthz", node.agent_url);
    let as_server = valid_for_an_hour(&ca, &Identity::new(Role::Server, "server-test"));
    let r = to_agent(Some(as_server))
        .get(&health)
        .send()
        .await
        .expect("a server certificate gets in");
    assert_eq!(r.status().as_u16(), 200);
    let as_agent = valid_for_an_hour(&ca, &Identity::new(Role::Agent, "n2"));
    assert!(
        to_agent(Some(as_agent)).get(&health).send().await.is_err(),
        "an agent certificate: refused at the handshake"
    );
    agent_api_without_a_certificate(&cloud, &node.agent_url, &to_agent).await;

    // Restarted, the agent reuses its certificate (no token needed).
    cloud
        .join_agent("n1", None)
        .expect("agent restarts with its certificate");
    let out = cloud
        .cli()
        .args(["exec", "web", "--", "cat", "/var/www/index.html"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hello-over-mtls"),
        "exec after the restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The joined agent's API to a client without a certificate: `/metrics` answers the cluster's
/// metrics token (as a stock Prometheus sends it: CA-verified, the node's name as server name)
/// and nothing else; exec, logs and console refuse every bearer token (the metrics token, the
/// servers' HMAC credential of plain mode, the admin token).
async fn agent_api_without_a_certificate(
    cloud: &TlsCloud,
    agent_url: &str,
    to_agent: &dyn Fn(Option<(String, String)>) -> reqwest::Client,
) {
    let metrics_token = std::fs::read_to_string(cloud.data_dir.join("metrics.token"))
        .expect("the server made a metrics token")
        .trim()
        .to_owned();
    // A stock scraper: the cluster CA, host-name verification of the node's name, no
    // client certificate, TLS 1.3.
    let mut roots = rustls::RootCertStore::empty();
    for c in nimbus_pki::certs_from_pem(&cloud.ca_pem()).unwrap() {
        roots.add(c).unwrap();
    }
    let stock = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let addr: std::net::SocketAddr = agent_url
        .trim_start_matches("https://")
        .trim_end_matches('/')
        .parse()
        .expect("agent address");
    let prometheus = reqwest::Client::builder()
        .use_preconfigured_tls(stock)
        .resolve("n1", addr)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let metrics = format!("https://n1:{}/metrics", addr.port());
    let r = prometheus
        .get(&metrics)
        .bearer_auth(&metrics_token)
        .send()
        .await
        .expect("the agent's certificate verifies against the cluster CA as n1");
    assert_eq!(r.status().as_u16(), 200, "metrics with the metrics token");
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{:?}",
        r.headers()
    );
    let servers_hmac = nimbus_agent::credential::load(&cloud.agent_dir("n1"))
        .unwrap()
        .expect("node.credential")
        .agent_api_token;
    assert!(
        !servers_hmac.is_empty(),
        "the agent knows the servers' token"
    );
    let none = to_agent(None);
    for token in [None, Some("nope"), Some(cloud.token.as_str())] {
        let mut req = none.get(format!("{agent_url}/metrics"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req
            .send()
            .await
            .expect("no certificate: the handshake passes");
        assert_eq!(r.status().as_u16(), 401, "metrics with {token:?}");
    }
    let web = cloud.client().get_instance("web").await.unwrap().meta.id;
    for token in [
        None,
        Some(&metrics_token),
        Some(&servers_hmac),
        Some(&cloud.token),
    ] {
        let with = |r: reqwest::RequestBuilder| match token {
            Some(t) => r.bearer_auth(t),
            None => r,
        };
        let exec = with(none.post(format!("{agent_url}/agent/v1/instances/{web}/exec")))
            .json(&serde_json::json!({"command": ["true"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(exec.status().as_u16(), 401, "exec with {token:?}");
        for route in ["logs", "console"] {
            let r = with(none.get(format!("{agent_url}/agent/v1/instances/{web}/{route}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status().as_u16(), 401, "{route} with {token:?}");
        }
    }
    let health = none
        .get(format!("{agent_url}/agent/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200, "healthz is open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reused_or_expired_join_token_is_refused() {
    let cloud = TlsCloud::start(bin(), &[]).expect("nimbus server");
    let c = cloud.client();

    let short = cloud.join_token("1s").expect("join token");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    match join(&cloud, &short, "late").await {
        Err(ClientError::Api(e)) => {
            assert_eq!(e.code, ErrorCode::Unauthorized);
            assert!(e.message.contains("expired"), "{}", e.message);
        }
        other => panic!("an expired token must be refused: {other:?}"),
    }

    let token = cloud.join_token("1h").expect("join token");
    join(&cloud, &token, "first")
        .await
        .expect("first use works");
    match join(&cloud, &token, "second").await {
        Err(ClientError::Api(e)) => {
            assert_eq!(e.code, ErrorCode::Unauthorized);
            assert!(e.message.contains("unknown join token"), "{}", e.message);
        }
        other => panic!("a used token must be refused: {other:?}"),
    }

    // The agent says so and writes nothing.
    let out = cloud.failing_agent("reuser", &token).expect("agent run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("unknown join token"), "{err}");
    assert!(!cloud.agent_dir("reuser").join("pki/node.crt").exists());
    assert!(
        !c.list_nodes()
            .await
            .unwrap()
            .iter()
            .any(|n| n.meta.name == "reuser"),
        "nothing registered"
    );
    // A garbage token too.
    assert!(
        matches!(join(&cloud, "not-a-token", "x").await, Err(ClientError::Api(e)) if e.code == ErrorCode::Unauthorized)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_or_expired_client_certificates_are_refused() {
    let cloud = TlsCloud::start(bin(), &[]).expect("nimbus server");
    let ca = cluster_ca(&cloud);
    let id = Identity::new(Role::Agent, "probe");

    let (c, k) = valid_for_an_hour(&ca, &id);
    assert_eq!(
        renew(&cloud, &mtls(&cloud, (&c, &k)), "probe").await,
        Ok(200),
        "control: a valid certificate works"
    );

    // The certificate registers its own node only (the body is checked, then handed on).
    let http = mtls(&cloud, (&c, &k));
    let register = |name: &str| nimbus_api::agent::RegisterNodeRequest {
        name: name.into(),
        agent_url: "https://127.0.0.1:9".into(),
        capacity: nimbus_api::Capacity {
            cpu_millis: 1000,
            memory_bytes: 1 << 30,
            disk_bytes: 1 << 30,
        },
        capabilities: nimbus_api::NodeCapabilities::default(),
        zone: String::new(),
        labels: std::collections::BTreeMap::new(),
        agent_version: "test".into(),
        underlay_ip: String::new(),
    };
    let r = http
        .post(format!("{}/v1/nodes", cloud.url))
        .json(&register("victim"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status().as_u16(),
        403,
        "another node's name: {}",
        r.text().await.unwrap()
    );
    let r = http
        .post(format!("{}/v1/nodes", cloud.url))
        .json(&register("probe"))
        .send()
        .await
        .unwrap();
    assert!(
        r.status().is_success(),
        "its own name: {}",
        r.text().await.unwrap()
    );
    let nodes = cloud.client().list_nodes().await.unwrap();
    assert!(
        nodes.iter().any(|n| n.meta.name == "probe")
            && !nodes.iter().any(|n| n.meta.name == "victim")
    );

    let foreign = Ca::generate("foreign").unwrap();
    let (c, k) = valid_for_an_hour(&foreign, &id);
    assert!(
        renew(&cloud, &mtls(&cloud, (&c, &k)), "probe")
            .await
            .is_err(),
        "a foreign CA's certificate is refused at the handshake"
    );

    let now = SystemTime::now();
    let (c, k) = signed(
        &ca,
        &id,
        now - Duration::from_secs(7200),
        now - Duration::from_secs(60),
    );
    assert!(
        renew(&cloud, &mtls(&cloud, (&c, &k)), "probe")
            .await
            .is_err(),
        "an expired certificate is refused"
    );

    // Without a certificate, renewal is refused with a clear error.
    let anon = reqwest::Client::builder()
        .use_preconfigured_tls(cloud.tls_config(None))
        .build()
        .unwrap();
    assert_eq!(renew(&cloud, &anon, "probe").await, Ok(401));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_node_is_refused_within_a_second() {
    let cloud = TlsCloud::start(bin(), &[]).expect("nimbus server");
    let token = cloud.join_token("1h").unwrap();
    let (c, k) = join(&cloud, &token, "rv1").await.expect("join");
    let http = mtls(&cloud, (&c, &k));
    assert_eq!(renew(&cloud, &http, "rv1").await, Ok(200));

    let out = cloud
        .cli()
        .args(["node", "revoke", "rv1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked_at = Instant::now();
    // The open keep-alive connection is refused at its next request...
    let refused = eventually(Duration::from_secs(1), || async {
        match renew(&cloud, &http, "rv1").await {
            Ok(200) => None,
            other => Some(other),
        }
    })
    .await;
    let took = revoked_at.elapsed();
    assert!(
        refused.is_some() && took < Duration::from_secs(1),
        "still accepted {took:?} after the revoke"
    );
    assert_eq!(refused.unwrap(), Ok(401));
    // ...and a new connection at the handshake.
    assert!(renew(&cloud, &mtls(&cloud, (&c, &k)), "rv1").await.is_err());
    // The name cannot join again.
    let t2 = cloud.join_token("1h").unwrap();
    assert!(
        matches!(join(&cloud, &t2, "rv1").await, Err(ClientError::Api(e)) if e.code == ErrorCode::Forbidden)
    );
}

/// Server (and agent) certificates of 9 s are renewed every ~6 s while clients hammer the API
/// on kept-alive and on fresh connections: no request fails, the agent stays ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_dropping_requests() {
    if !deps() {
        return;
    }
    let mut cloud = TlsCloud::start(bin(), &["--cert-lifetime", "9s"]).expect("nimbus server");
    let token = cloud.join_token("1h").unwrap();
    cloud.join_agent("n1", Some(&token)).expect("agent joins");
    let c = cloud.client();
    let node_crt = cloud.agent_dir("n1").join("pki/node.crt");
    let mut server_serials = std::collections::BTreeSet::new();
    let mut agent_serials = std::collections::BTreeSet::new();
    let (mut ok, mut failed) = (0u32, Vec::new());
    let start = Instant::now();
    let end = start + Duration::from_secs(22);
    while Instant::now() < end {
        // Kept-alive connection.
        match c.list_nodes().await {
            Ok(nodes) => {
                ok += 1;
                if start.elapsed() > Duration::from_secs(4) {
                    let n1 = nodes.iter().find(|n| n.meta.name == "n1");
                    assert_eq!(
                        n1.map(|n| n.state),
                        Some(NodeState::Ready),
                        "n1 must stay ready"
                    );
                }
            }
            Err(e) => failed.push(format!("kept-alive: {e}")),
        }
        // A fresh connection (new handshake, the current certificate).
        let fresh = cloud.client();
        match fresh.list_projects().await {
            Ok(_) => ok += 1,
            Err(e) => failed.push(format!("fresh: {e}")),
        }
        if let Ok(pem) = std::fs::read_to_string(&node_crt) {
            if let Ok(der) = nimbus_pki::certs_from_pem(&pem) {
                agent_serials.insert(nimbus_pki::PeerCert::from_der(&der[0]).unwrap().serial);
            }
        }
        server_serials.insert(server_serial(&cloud).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );
    assert!(ok > 50, "only {ok} requests");
    assert!(
        server_serials.len() >= 3,
        "the server certificate must rotate: {server_serials:?}"
    );
    assert!(
        agent_serials.len() >= 3,
        "the agent certificate must rotate: {agent_serials:?}"
    );
}

/// The serial of the certificate the server presents now.
async fn server_serial(cloud: &TlsCloud) -> String {
    server_cert(cloud).await.serial
}

/// The certificate the server presents now.
async fn server_cert(cloud: &TlsCloud) -> nimbus_pki::PeerCert {
    let probe = Arc::new(nimbus_pki::config::ChainProbe::default());
    let cfg = nimbus_pki::pinning_probe_config(probe.clone()).unwrap();
    let tcp = tokio::net::TcpStream::connect(cloud.url.trim_start_matches("https://"))
        .await
        .unwrap();
    let _ = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls::pki_types::ServerName::try_from("nimbus").unwrap(),
            tcp,
        )
        .await;
    let chain = probe.chain.lock().unwrap().clone();
    nimbus_pki::PeerCert::from_der(&chain[0]).unwrap()
}

fn serial_of(chain_pem: &str) -> String {
    let der = nimbus_pki::certs_from_pem(chain_pem).unwrap();
    nimbus_pki::PeerCert::from_der(&der[0]).unwrap().serial
}

/// A client of an agent's API presenting `cert` (chain, key).
fn agent_client(cloud: &TlsCloud, cert: &(String, String)) -> reqwest::Client {
    let roots = nimbus_pki::verify::roots(&cloud.ca_pem()).unwrap();
    let v = nimbus_pki::ClusterServerVerifier::new(
        roots,
        vec![Role::Agent],
        Arc::new(nimbus_pki::NoRevocation),
    );
    let store = Arc::new(nimbus_pki::CertStore::new(&cert.0, &cert.1).unwrap());
    reqwest::Client::builder()
        .use_preconfigured_tls(nimbus_pki::client_config(Arc::new(v), Some(store)).unwrap())
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// `GET /metrics` of an agent (a server certificate opens it): the status and the error
/// code, or the transport error.
async fn agent_metrics(http: &reqwest::Client, agent_url: &str) -> Result<(u16, String), String> {
    let r = http
        .get(format!("{agent_url}/metrics"))
        .send()
        .await
        .map_err(|e| format!("{e:?}"))?;
    let status = r.status().as_u16();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    Ok((
        status,
        body["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    ))
}

/// Agents learn the revoked server certificates from their servers: one revoked by serial
/// (`nimbus server revoke NAME --serial`) is refused by the agent's API within a second on its
/// kept-alive connection (401 certificate_revoked) and then at the handshake, while another
/// certificate of the same server still works; a server certificate kept alive past its
/// expiry gets 401 certificate_expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_server_certificate_is_refused_by_the_agent_within_a_second() {
    if !deps() {
        return;
    }
    let mut cloud = TlsCloud::start(bin(), &[]).expect("nimbus server");
    let token = cloud.join_token("1h").unwrap();
    cloud.join_agent("n1", Some(&token)).expect("agent joins");
    let c = cloud.client();
    let node = eventually(Duration::from_secs(30), || async {
        c.list_nodes().await.ok().and_then(|n| {
            n.into_iter()
                .find(|n| n.meta.name == "n1" && n.state == NodeState::Ready)
        })
    })
    .await
    .expect("n1 ready");
    let url = node.agent_url.clone();
    let ca = cluster_ca(&cloud);
    let name = server_cert(&cloud).await.identity.name;
    let id = Identity::new(Role::Server, &name);
    let now = SystemTime::now();
    let stolen = valid_for_an_hour(&ca, &id);
    let other = valid_for_an_hour(&ca, &id);
    let short = signed(
        &ca,
        &id,
        now - Duration::from_secs(60),
        now + Duration::from_secs(3),
    );
    let (kept, short_lived) = (agent_client(&cloud, &stolen), agent_client(&cloud, &short));
    assert_eq!(agent_metrics(&kept, &url).await, Ok((200, String::new())));
    assert_eq!(
        agent_metrics(&short_lived, &url).await,
        Ok((200, String::new()))
    );

    let out = cloud
        .cli()
        .args(["server", "revoke", &name, "--serial", &serial_of(&stolen.0)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let revoked_at = Instant::now();
    let refused = eventually(Duration::from_secs(1), || async {
        match agent_metrics(&kept, &url).await {
            Ok((200, _)) => None,
            other => Some(other),
        }
    })
    .await;
    let took = revoked_at.elapsed();
    assert!(
        refused.is_some() && took < Duration::from_secs(1),
        "the agent still took the revoked certificate {took:?} after the revoke"
    );
    eprintln!("the agent refused the revoked server certificate {took:?} after the revoke");
    assert_eq!(refused.unwrap(), Ok((401, "certificate_revoked".into())));
    assert!(
        agent_metrics(&agent_client(&cloud, &stolen), &url)
            .await
            .is_err(),
        "a new connection with it fails the handshake"
    );
    assert_eq!(
        agent_metrics(&agent_client(&cloud, &other), &url).await,
        Ok((200, String::new())),
        "another certificate of the same server still works"
    );

    // Expiry on the kept-alive connection.
    let expires = now + Duration::from_secs(3);
    if let Ok(left) = expires.duration_since(SystemTime::now()) {
        tokio::time::sleep(left + Duration::from_millis(1100)).await;
    }
    assert_eq!(
        agent_metrics(&short_lived, &url).await,
        Ok((401, "certificate_expired".into()))
    );
}

/// `nimbus server revoke` of an unknown server fails with one line; the cluster's last
/// server (here also the one answering) is not revoked without --force.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_revoke_refuses_unknown_names_and_the_last_server() {
    let cloud = TlsCloud::start(bin(), &[]).expect("nimbus server");
    let one_line_failure = |args: &[&str]| {
        let out = cloud.cli().args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        assert!(!out.status.success(), "{args:?} must fail");
        assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
        err
    };
    let err = one_line_failure(&["server", "revoke", "server-0"]);
    assert!(err.contains("\"server-0\" not found"), "{err}");
    let err = one_line_failure(&["server", "revoke", "Not_A_Name"]);
    assert!(err.contains("name"), "{err}");
    let name = server_cert(&cloud).await.identity.name;
    let err = one_line_failure(&["server", "revoke", &name]);
    assert!(err.contains("--force"), "{err}");
    // The raw answer: a JSON 404 with its stable code.
    let r = reqwest::Client::builder()
        .use_preconfigured_tls(cloud.tls_config(None))
        .build()
        .unwrap()
        .post(format!("{}/v1/pki/revoke/server-0?role=server", cloud.url))
        .bearer_auth(&cloud.token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    // Nothing changed: the server still works with its certificate.
    let token = cloud.join_token("1h").expect("the server still works");
    join(&cloud, &token, "after")
        .await
        .expect("and issues certificates");
}

/// A connection kept alive past its client certificate's expiry (`--cert-lifetime`) gets
/// `401 certificate_expired` at its next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_kept_alive_past_its_certificate_expiry_gets_401() {
    let cloud = TlsCloud::start(bin(), &["--cert-lifetime", "4s"]).expect("nimbus server");
    let token = cloud.join_token("1h").unwrap();
    let (c, k) = join(&cloud, &token, "ex1").await.expect("join");
    let der = nimbus_pki::certs_from_pem(&c).unwrap();
    let not_after = nimbus_pki::PeerCert::from_der(&der[0]).unwrap().not_after;
    let http = mtls(&cloud, (&c, &k));
    let healthz = |http: reqwest::Client| {
        let url = format!("{}/healthz", cloud.url);
        async move {
            let r = http.get(url).send().await.map_err(|e| format!("{e:?}"))?;
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            Ok::<_, String>((
                status,
                body["error"]["code"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ))
        }
    };
    assert_eq!(healthz(http.clone()).await, Ok((200, String::new())));
    let left = not_after - nimbus_server::identity::unix_now();
    tokio::time::sleep(Duration::from_millis(left.max(0) as u64 * 1000 + 1100)).await;
    assert_eq!(
        healthz(http.clone()).await,
        Ok((401, "certificate_expired".into())),
        "the kept-alive connection"
    );
    assert!(
        healthz(http).await.is_err(),
        "then the connection is closed and a new handshake fails"
    );
}
