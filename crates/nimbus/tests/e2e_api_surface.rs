//! End to end against a real `nimbus up`: every error is a JSON error body (a wrong method's
//! 405, a bad query string's 400), the OpenAPI document declares the bearer scheme and the
//! error statuses, exec output cut at its limit says so (API field and CLI warning), and an
//! image whose layer escapes its root is refused at import without naming server paths.

use std::path::Path;
use std::time::Duration;

use nimbus_api::{CreateInstanceRequest, InstanceState};
use nimbus_image::testutil::{self, FixtureConfig, LayerEntry};
use nimbus_testkit::{eventually, have, require, Cloud};
use reqwest::Method;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

fn deps() -> bool {
    require("root", nix::unistd::geteuid().is_root())
        && require("runc", have("runc"))
        && require("/bin/busybox", Path::new("/bin/busybox").exists())
}

/// Sends `method path` with the admin token; (status, `Allow` header, JSON body).
async fn call(
    cloud: &Cloud,
    method: reqwest::Method,
    path: &str,
) -> (u16, Option<String>, serde_json::Value) {
    let r = reqwest::Client::new()
        .request(method, format!("{}{path}", cloud.url))
        .bearer_auth(&cloud.token)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let allow = r
        .headers()
        .get("allow")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let ct = r
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let text = r.text().await.unwrap_or_default();
    let body =
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path}: not JSON ({ct}): {text:?}"));
    (status, allow, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_spec_exec_truncation_and_hostile_images() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");

    // A wrong method: 405 with the JSON error and the allowed methods.
    for (m, path) in [
        (Method::PUT, "/v1/projects"),
        (Method::PATCH, "/v1/images/busybox"),
        (Method::DELETE, "/v1/events"),
    ] {
        let (status, allow, body) = call(&cloud, m.clone(), path).await;
        assert_eq!(status, 405, "{m} {path}: {body}");
        assert_eq!(body["error"]["code"], "method_not_allowed", "{m} {path}");
        assert!(body["error"]["message"]
            .as_str()
            .is_some_and(|s| !s.is_empty()));
        assert!(allow.is_some(), "{m} {path}: no Allow header");
    }
    // Bad query strings: JSON 400 naming the parameter, on every kind of route.
    for (path, field) in [
        ("/v1/projects/default/instances?limit=abc", Some("limit")),
        ("/v1/events?after=-1", Some("after")),
        ("/v1/images?stale=maybe", Some("stale")),
        (
            "/v1/projects/default/instances/x/logs?tail=lots",
            Some("tail"),
        ),
        ("/v1/images/blobs/sha256:00?local=maybe", Some("local")),
    ] {
        let (status, _, body) = call(&cloud, Method::GET, path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["error"]["code"], "bad_request", "{path}: {body}");
        if let Some(f) = field {
            assert_eq!(body["error"]["field"], f, "{path}: {body}");
        }
    }
    // The spec: the bearer scheme, and every authenticated operation documents its errors.
    let (status, _, spec) = call(&cloud, Method::GET, "/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(
        spec["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let mut undocumented = Vec::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for s in ["400", "401", "403", "404", "503"] {
                if path != "/healthz" && op["responses"].get(s).is_none() {
                    undocumented.push(format!("{method} {path} {s}"));
                }
            }
        }
    }
    assert!(undocumented.is_empty(), "{undocumented:?}");

    // Exec output over the limit is cut and says so.
    let c = cloud.client();
    c.create_instance(
        &CreateInstanceRequest {
            name: "chatty".into(),
            image: "busybox".into(),
            memory: Some(serde_json::json!("64M")),
            command: vec!["sleep".into(), "3600".into()],
            ..CreateInstanceRequest::default()
        },
        None,
    )
    .await
    .expect("create");
    eventually(Duration::from_secs(60), || async {
        c.get_instance("chatty")
            .await
            .ok()
            .filter(|i| i.status.state == InstanceState::Running)
    })
    .await
    .unwrap_or_else(|| panic!("chatty never ran\n{}", cloud.log()));
    let big = "head -c 5000000 /dev/zero | tr '\\0' a";
    let r = c
        .exec("chatty", vec!["sh".into(), "-c".into(), big.into()])
        .await
        .expect("exec");
    assert_eq!(r.exit_code, 0);
    assert!(r.truncated, "5 MB of output not marked truncated");
    assert_eq!(r.stdout.len(), 4 << 20);
    let r = c
        .exec("chatty", vec!["echo".into(), "short".into()])
        .await
        .expect("exec");
    assert!(!r.truncated && r.stdout == "short\n", "{r:?}");
    let o = cloud
        .cli()
        .args(["exec", "chatty", "--", "sh", "-c", big])
        .output()
        .expect("cli exec");
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("warning: the output was truncated"),
        "no warning on stderr: {stderr}"
    );
    assert_eq!(o.stdout.len(), 4 << 20);

    // An image whose layer writes through a symlink out of its root is refused at import,
    // with a clear error that names none of the server's paths, and nothing is recorded.
    let dir = tempfile::tempdir().unwrap();
    let evil = dir.path().join("evil.tar");
    testutil::write_oci_layout_tarball_layers(
        &[testutil::layer_tar(&[
            LayerEntry::symlink("etc", "/etc"),
            LayerEntry::file("etc/cron.d/own", b"* * * * * root id\n"),
        ])
        .unwrap()],
        &evil,
        &FixtureConfig::default(),
    )
    .unwrap();
    let o = cloud
        .cli()
        .args(["image", "import", evil.to_str().unwrap(), "--name", "evil"])
        .output()
        .expect("cli import");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("below the symlink etc"), "{out}");
    let data = cloud.data_dir.display().to_string();
    assert!(
        !out.contains(&data) && !out.contains("/tmp/"),
        "server path leaked: {out}"
    );
    assert!(
        c.list_images()
            .await
            .unwrap()
            .iter()
            .all(|i| i.meta.name != "evil"),
        "the refused image was recorded"
    );
}
