//! API fuzzing: schemathesis (installed by `scripts/setup` into `/opt/nimbus-venv`) generates
//! requests from `/v1/openapi.json` of a fresh cloud (one server and one agent) and fails on
//! any 5xx, any response that does not match the documented schema or content type, any
//! status the spec does not list for the operation, and a wrong answer to an undocumented
//! method (405 with `Allow`). The server serves TLS with its internal CA and the agent joined
//! it with a join token; the fuzzer runs once with the admin token and once with the agent's
//! certificate (no bearer token: the node's own identity), with a fixed seed and example
//! budget.
//!
//! The cloud runs in a network namespace of the testkit harness: what the fuzzer makes it do
//! to the network (VIPs, published ports, nftables, bridges) stays there, and its data dir is
//! temporary. Streaming and long-poll operations (logs, console, events, watch, assignments)
//! are left out: they answer by holding the connection open, which the fuzzer counts as a
//! timeout (see [`EXCLUDED`]). Path parameters named `project` are set to the existing
//! project so the operations under it reach their handlers.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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
/// Operations left out: those that stream or long-poll, and `POST /v1/fleet/register`, whose
/// deeply nested body schema crashes schemathesis 4.32.5's own example generator on Python
/// 3.11 (`SystemError: AST constructor recursion depth mismatch`, a tool error, not an answer
/// of the API).
const EXCLUDED: &str = "/logs$|/console$|/watch$|/assignments$|^/v1/events$|^/v1/fleet/register$";

/// Path parameters named `project` get the project that exists, so the operations under it
/// reach their handlers' logic instead of a 404. Phases: examples, coverage and fuzzing (no
/// stateful links). `POST /v1/nodes` skips the coverage phase only: its generator for that
/// body trips the same Python 3.11 AST bug intermittently (a Hypothesis `FlakyFailure` inside
/// schemathesis, before any request); the fuzzing phase still covers the operation. `POST
/// /v1/fleet/heartbeats` skips the fuzzing phase for the same bug (`AST constructor recursion
/// depth mismatch` in 2 of 9 runs against the TLS server); its coverage phase still runs.
const CONFIG: &str = r#"[parameters]
"path.project" = "default"

[phases.stateful]
enabled = false

[[operations]]
include-path = "/v1/nodes"
include-method = "POST"
phases.coverage.enabled = false

[[operations]]
include-path = "/v1/fleet/heartbeats"
include-method = "POST"
phases.fuzzing.enabled = false
"#;

/// How the fuzzer authenticates.
enum Auth {
    /// A bearer token.
    Token(String),
    /// The certificate of `node` and its key (PEM files). `ignored_auth` is left out:
    /// requests without the `Authorization` header the spec declares still carry the
    /// certificate.
    Certificate {
        cert: PathBuf,
        key: PathBuf,
        node: &'static str,
    },
}

/// Runs schemathesis over the spec saved in `spec` against `url` (TLS verified with `ca`)
/// as `auth`; (passed, output, time taken).
fn fuzz(
    st: &Path,
    spec: &Path,
    url: &str,
    ca: &Path,
    auth: &Auth,
    report: &Path,
) -> (bool, String, Duration) {
    let started = Instant::now();
    let config = report.with_extension("toml");
    let project = "\"path.project\" = \"default\"\n";
    let text = match auth {
        // Path parameters named `name` get the node's own name, so its routes reach their
        // handlers instead of a 403.
        Auth::Certificate { node, .. } => {
            CONFIG.replace(project, &format!("{project}\"path.name\" = \"{node}\"\n"))
        }
        Auth::Token(_) => CONFIG.to_owned(),
    };
    std::fs::write(&config, text).expect("config");
    let mut cmd = Command::new(st);
    cmd.arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(spec)
        .args(["--url", url])
        .arg("--tls-verify")
        .arg(ca);
    match auth {
        Auth::Token(t) => {
            cmd.args(["--checks", CHECKS])
                .args(["--header", &format!("Authorization: Bearer {t}")]);
        }
        Auth::Certificate { cert, key, .. } => {
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
        .args(["--exclude-path-regex", EXCLUDED])
        .args(["--request-timeout", "20", "--workers", "2", "--no-shrink"])
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
    let mut failures = Vec::new();
    for (who, auth) in [
        ("admin token", Auth::Token(net.admin_token.clone())),
        (
            "agent certificate",
            Auth::Certificate {
                cert: pki.join("node.crt"),
                key: pki.join("node.key"),
                node: "h0",
            },
        ),
    ] {
        let report = reports.path().join(who.replace(' ', "-"));
        let (ok, text, took) = fuzz(&st, &spec, &url, &ca, &auth, &report);
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
