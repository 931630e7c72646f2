//! API fuzzing: schemathesis (installed by `scripts/setup` into `/opt/nimbus-venv`) generates
//! requests from the OpenAPI documents of a fresh cloud (one server and one agent) and fails on
//! any 5xx, any response that does not match the documented schema or content type, any
//! status the spec does not list for the operation, and a wrong answer to an undocumented
//! method (405 with `Allow`). The server serves TLS with its internal CA and the agent joined
//! it with a join token. Three runs, with a fixed seed and example budget: the server's API
//! (`/v1/openapi.json`) with the agent's certificate (no bearer token: the node's own
//! identity), the agent's own API (`/agent/v1/openapi.json`: exec on a running instance,
//! metrics, health) with a server certificate, and the server's API with the admin token.
//!
//! The cloud runs in a network namespace of the testkit harness: what the fuzzer makes it do
//! to the network (VIPs, published ports, nftables, bridges) stays there, and its data dir is
//! temporary. Streaming and long-poll operations (logs, console, events, watch, assignments)
//! are left out: they answer by holding the connection open, which the fuzzer counts as a
//! timeout (see [`EXCLUDED`]). Path parameters named `project` are set to the existing
//! project, and `id` on the agent API to the running instance, so the operations reach their
//! handlers.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nimbus_api::{CreateInstanceRequest, InstanceState};
use nimbus_pki::{Identity, Role};
use nimbus_testkit::netns::{self, Net};
use nimbus_testkit::{eventually, have, require};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

/// The schemathesis executable: `$NIMBUS_SCHEMATHESIS`, the setup script's venv, or PATH.
fn schemathesis() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NIMBUS_SCHEMATHESIS") {
        return Some(PathBuf::from(p));
    }
    let venv = PathBuf::from("/opt/nimbus-venv/bin/schemathesis");
    if venv.is_file() {
        return Some(venv);
    }
    have("schemathesis").then(|| PathBuf::from("schemathesis"))
}

/// Examples per operation and phase (the whole test stays within about three minutes).
const EXAMPLES: &str = "20";
/// The fixed seed: a failure reproduces.
const SEED: &str = "20261207";
/// Checks that fail the run.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
response_schema_conformance,response_headers_conformance,unsupported_method,\
allow_header_conformance,ignored_auth";
/// Operations left out: those that stream or long-poll.
const EXCLUDED: &str = "/logs$|/console$|/watch$|/assignments$|^/v1/events$";

/// Phases: examples, coverage and fuzzing (no stateful links).
const CONFIG: &str = "
[phases.stateful]
enabled = false
";

/// How the fuzzer authenticates.
enum Auth {
    /// A bearer token.
    Token(String),
    /// A client certificate and its key (PEM files). `ignored_auth` is left out: requests
    /// without the `Authorization` header the spec declares still carry the certificate.
    Certificate { cert: PathBuf, key: PathBuf },
}

/// What one schemathesis run fuzzes.
struct Target<'a> {
    /// The OpenAPI document (a file).
    spec: &'a Path,
    /// Base URL.
    url: &'a str,
    /// The CA that verifies the server's certificate (`None`: not verified).
    ca: Option<&'a Path>,
    /// Operations left out (a regular expression over paths).
    excluded: &'a str,
    /// Path parameters set to a fixed value: (name, value).
    params: &'a [(&'a str, &'a str)],
}

/// Runs schemathesis over `target` as `auth`; (passed, output, time taken).
fn fuzz(st: &Path, target: &Target, auth: &Auth, report: &Path) -> (bool, String, Duration) {
    let started = Instant::now();
    let config = report.with_extension("toml");
    let mut text = String::from("[parameters]\n");
    for (name, value) in target.params {
        let _ = writeln!(text, "\"path.{name}\" = \"{value}\"");
    }
    text.push_str(CONFIG);
    std::fs::write(&config, text).expect("config");
    let mut cmd = Command::new(st);
    cmd.arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(target.spec)
        .args(["--url", target.url]);
    match target.ca {
        Some(ca) => cmd.arg("--tls-verify").arg(ca),
        None => cmd.arg("--tls-verify=false"),
    };
    match auth {
        Auth::Token(t) => {
            cmd.args(["--checks", CHECKS])
                .args(["--header", &format!("Authorization: Bearer {t}")]);
        }
        Auth::Certificate { cert, key } => {
            let checks: Vec<&str> = CHECKS.split(',').filter(|c| *c != "ignored_auth").collect();
            cmd.args(["--checks", &checks.join(",")])
                .arg("--request-cert")
                .arg(cert)
                .arg("--request-cert-key")
                .arg(key);
        }
    }
    let out = cmd
        .args(["--max-examples", EXAMPLES, "--seed", SEED])
        .args(["--exclude-path-regex", target.excluded])
        // One worker: CPython 3.11's AST constructor keeps its recursion depth in state that
        // threads share, so two workers' generators intermittently fail inside schemathesis
        // with `SystemError: AST constructor recursion depth mismatch` (CPython gh-106905),
        // on a random operation, before any request.
        .args(["--request-timeout", "20", "--workers", "1", "--no-shrink"])
        .args(["--suppress-health-check", "all"])
        .args(["--report", "junit,har", "--report-dir"])
        .arg(report)
        .env("NO_COLOR", "1")
        // Its cache directory goes there too, not into the source tree.
        .current_dir(report.parent().unwrap_or(report))
        .output()
        .expect("run schemathesis");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text, started.elapsed())
}

/// The response statuses in the HAR reports schemathesis wrote into `dir`.
fn har_statuses(dir: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(e.path()) else {
            continue;
        };
        let Ok(har) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        for entry in har["log"]["entries"].as_array().into_iter().flatten() {
            out.extend(entry["response"]["status"].as_u64());
        }
    }
    out
}

/// A server certificate and key (PEM files in `dir`): a new server's CSR traded for it at the
/// server of `url` with the cluster secret, as `nimbus server --join` does.
async fn server_certificate(net: &Net, url: &str, ca_pem: &str, dir: &Path) -> (PathBuf, PathBuf) {
    let secret = std::fs::read_to_string(&net.cluster_secret_file).expect("cluster secret");
    let (key, csr) =
        nimbus_pki::new_key_and_csr(&Identity::new(Role::Server, "server-f022")).expect("CSR");
    let issued: serde_json::Value = reqwest::Client::builder()
        .use_preconfigured_tls(nimbus_testkit::tls::client_config(ca_pem, None))
        .build()
        .unwrap()
        .post(format!("{url}/raft/pki/join"))
        .bearer_auth(secret.trim())
        .json(&serde_json::json!({"node_id": 0xf022, "csr": csr}))
        .send()
        .await
        .expect("server join")
        .json()
        .await
        .expect("issued certificate");
    let cert = issued["cert_pem"].as_str().expect("cert_pem");
    let (cert_file, key_file) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&cert_file, cert).expect("write cert");
    std::fs::write(&key_file, key).expect("write key");
    (cert_file, key_file)
}

/// A client config for an agent's API: the agent's certificate verified by its role (it
/// names the node, not the address), presenting the server certificate in the given files.
fn agent_client_config(ca_pem: &str, cert: &Path, key: &Path) -> rustls::ClientConfig {
    let roots = nimbus_pki::verify::roots(ca_pem).expect("CA");
    let v = nimbus_pki::ClusterServerVerifier::new(
        roots,
        vec![Role::Agent],
        std::sync::Arc::new(nimbus_pki::NoRevocation),
    );
    let own = nimbus_pki::CertStore::new(
        &std::fs::read_to_string(cert).expect("cert"),
        &std::fs::read_to_string(key).expect("key"),
    )
    .expect("server certificate");
    nimbus_pki::client_config(std::sync::Arc::new(v), Some(std::sync::Arc::new(own)))
        .expect("TLS config")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_5xx_schema_violation_or_undocumented_status() {
    let st = schemathesis();
    if !(require(
        "root, ip, tc, nft, nsenter (netns harness)",
        netns::available(),
    ) && require("runc", have("runc"))
        && require("/bin/busybox", Path::new("/bin/busybox").exists())
        && require("schemathesis (scripts/setup installs it)", st.is_some()))
    {
        return;
    }
    let st = st.expect("checked");
    let mut net = Net::new(bin(), 1).expect("netns host");
    net.start_tls_server(0, &[]).expect("server");
    let ca = net.hosts[0].ca_file();
    let up = eventually(Duration::from_secs(30), || async {
        if !ca.exists() {
            return None;
        }
        net.client(0).health().await.ok()
    })
    .await;
    assert!(up.is_some(), "TLS server not up\n{}", net.logs_tail(20));
    let c = net.client(0);
    let join = c.create_join_token(600).await.expect("join token").token;
    net.join_agent(0, "h0", 0, &join, &[]).expect("agent");
    let ready = eventually(Duration::from_secs(60), || async {
        let nodes = c.list_nodes().await.ok()?;
        let images = c.list_images().await.ok()?;
        (nodes.len() == 1 && images.iter().any(|i| i.meta.name == "busybox")).then_some(())
    })
    .await;
    assert!(ready.is_some(), "cloud not ready\n{}", net.logs_tail(20));
    let url = net.hosts[0].url();
    let pki = net.hosts[0].data_dir.with_extension("agent").join("pki");
    let reports = tempfile::tempdir().unwrap();
    // The spec is read with the admin token (a node may not read it).
    let spec = reports.path().join("openapi.json");
    let ca_pem = std::fs::read_to_string(&ca).expect("CA");
    let body = reqwest::Client::builder()
        .use_preconfigured_tls(nimbus_testkit::tls::client_config(&ca_pem, None))
        .build()
        .unwrap()
        .get(format!("{url}/v1/openapi.json"))
        .bearer_auth(&net.admin_token)
        .send()
        .await
        .expect("spec")
        .text()
        .await
        .expect("spec body");
    std::fs::write(&spec, body).expect("write spec");
    // A running instance: the agent API's operations act on it (path parameter `id`).
    let target = c
        .create_instance(
            &CreateInstanceRequest {
                name: "fuzz-target".into(),
                image: "busybox".into(),
                command: vec!["sleep".into(), "3600".into()],
                ..Default::default()
            },
            None,
        )
        .await
        .expect("launch");
    let running = eventually(Duration::from_secs(60), || async {
        let i = c.get_instance("fuzz-target").await.ok()?;
        (i.status.state == InstanceState::Running).then_some(())
    })
    .await;
    assert!(
        running.is_some(),
        "fuzz-target not running\n{}",
        net.logs_tail(20)
    );
    // A server certificate for the agent API: a new server's CSR traded for it with the
    // cluster secret, as `nimbus server --join` does.
    let (server_cert, server_key) = server_certificate(&net, &url, &ca_pem, reports.path()).await;
    let agent_url = format!("https://{}:{}", net.hosts[0].addr, netns::AGENT_PORT);
    let agent_spec = reports.path().join("agent-openapi.json");
    let body = reqwest::Client::builder()
        .use_preconfigured_tls(agent_client_config(&ca_pem, &server_cert, &server_key))
        .build()
        .unwrap()
        .get(format!("{agent_url}/agent/v1/openapi.json"))
        .send()
        .await
        .expect("agent spec");
    assert_eq!(
        body.status(),
        200,
        "the agent's spec with a server certificate"
    );
    std::fs::write(&agent_spec, body.text().await.expect("agent spec body")).expect("write");
    let api = |auth_params: &'static [(&'static str, &'static str)]| Target {
        spec: &spec,
        url: &url,
        ca: Some(&ca),
        excluded: EXCLUDED,
        params: auth_params,
    };
    let mut failures = Vec::new();
    // The agent's certificate first: the admin's run may revoke or remove any node, this
    // one included (it does, with this seed). Its node's name goes into every `name` path
    // parameter, so its routes reach their handlers instead of a 403.
    let runs = [
        (
            "agent certificate",
            api(&[("project", "default"), ("name", "h0")]),
            Auth::Certificate {
                cert: pki.join("node.crt"),
                key: pki.join("node.key"),
            },
        ),
        // The agent's own API, with a server certificate (the agent's certificate names the
        // node, not its address: not verified here). Logs and console stream.
        (
            "server certificate on the agent API",
            Target {
                spec: &agent_spec,
                url: &agent_url,
                ca: None,
                excluded: "/logs$|/console$",
                params: &[("id", &target.meta.id)],
            },
            Auth::Certificate {
                cert: server_cert.clone(),
                key: server_key.clone(),
            },
        ),
        (
            "admin token",
            api(&[("project", "default")]),
            Auth::Token(net.admin_token.clone()),
        ),
    ];
    for (who, target, auth) in &runs {
        let report = reports.path().join(who.replace(' ', "-"));
        let (ok, text, took) = fuzz(&st, target, auth, &report);
        let summary: Vec<&str> = text
            .lines()
            .rev()
            .take(12)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        eprintln!(
            "schemathesis with the {who}: {} in {:.0} s\n{}",
            if ok { "passed" } else { "FAILED" },
            took.as_secs_f64(),
            summary.join("\n")
        );
        if !ok {
            failures.push(format!("--- {who} ---\n{text}"));
        }
        // The fuzzer's requests were authenticated (answers other than 401 came back).
        let statuses = har_statuses(&report);
        let authenticated = statuses.iter().filter(|s| **s != 401).count();
        eprintln!(
            "{} responses to the {who}, {authenticated} of them not 401",
            statuses.len()
        );
        assert!(
            authenticated * 2 > statuses.len(),
            "the {who} did not authenticate most requests: {} of {} were 401",
            statuses.len() - authenticated,
            statuses.len()
        );
    }
    // The server is still there and served no 5xx to the fuzzer.
    assert!(c.health().await.is_ok(), "{}", net.logs_tail(30));
    // Whatever the fuzzer created is removed before the harness goes.
    for p in c.list_projects().await.unwrap_or_default() {
        let pc = c.with_project(&p.meta.name);
        for i in pc.list_instances().await.unwrap_or_default() {
            let _ = pc.delete_instance(&i.meta.name).await;
        }
    }
    let _ = eventually(Duration::from_secs(60), || async {
        let mut left = 0;
        for p in c.list_projects().await.ok()? {
            left += c
                .with_project(&p.meta.name)
                .list_instances()
                .await
                .ok()?
                .len();
        }
        (left == 0).then_some(())
    })
    .await;
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
