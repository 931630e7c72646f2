//! API fuzzing: schemathesis (installed by `scripts/setup` into `/opt/nimbus-venv`) generates
//! requests from `/v1/openapi.json` of a fresh cloud (one server and one agent) and fails on
//! any 5xx, any response that does not match the documented schema or content type, any
//! status the spec does not list for the operation, and a wrong answer to an undocumented
//! method (405 with `Allow`). It runs once with the admin token and once with the node token,
//! with a fixed seed and example budget.
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
/// schemathesis, before any request); the fuzzing phase still covers the operation.
const CONFIG: &str = r#"[parameters]
"path.project" = "default"

[phases.stateful]
enabled = false

[[operations]]
include-path = "/v1/nodes"
include-method = "POST"
phases.coverage.enabled = false
"#;

/// Runs schemathesis over the spec saved in `spec` against `url` with `token`; (passed,
/// output, time taken).
fn fuzz(st: &Path, spec: &Path, url: &str, token: &str, report: &Path) -> (bool, String, Duration) {
    let started = Instant::now();
    let config = report.with_extension("toml");
    std::fs::write(&config, CONFIG).expect("config");
    let out = Command::new(st)
        .arg("--config-file")
        .arg(&config)
        .arg("run")
        .arg(spec)
        .args(["--url", url])
        .args(["--checks", CHECKS])
        .args(["--header", &format!("Authorization: Bearer {token}")])
        .args(["--max-examples", EXAMPLES, "--seed", SEED])
        .args(["--exclude-path-regex", EXCLUDED])
        .args(["--request-timeout", "20", "--workers", "2", "--no-shrink"])
        .args(["--suppress-health-check", "all"])
        .args(["--report", "junit", "--report-dir"])
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
    net.start_servers_with(0, &[]).expect("server");
    net.start_agent(0, "h0", &[]).expect("agent");
    let c = net.client(0);
    let ready = eventually(Duration::from_secs(60), || async {
        let nodes = c.list_nodes().await.ok()?;
        let images = c.list_images().await.ok()?;
        (nodes.len() == 1 && images.iter().any(|i| i.meta.name == "busybox")).then_some(())
    })
    .await;
    assert!(ready.is_some(), "cloud not ready\n{}", net.logs_tail(20));
    let url = net.hosts[0].url();
    let node_token = std::fs::read_to_string(&net.node_token_file)
        .expect("node token")
        .trim()
        .to_string();
    let reports = tempfile::tempdir().unwrap();
    // The spec is read with the admin token (the node token may not read it).
    let spec = reports.path().join("openapi.json");
    let body = reqwest::Client::new()
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
    for (who, token) in [("admin", net.admin_token.clone()), ("node", node_token)] {
        let (ok, text, took) = fuzz(&st, &spec, &url, &token, &reports.path().join(who));
        let summary: Vec<&str> = text
            .lines()
            .rev()
            .take(12)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        eprintln!(
            "schemathesis with the {who} token: {} in {:.0} s\n{}",
            if ok { "passed" } else { "FAILED" },
            took.as_secs_f64(),
            summary.join("\n")
        );
        if !ok {
            failures.push(format!("--- {who} token ---\n{text}"));
        }
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
