//! End to end: an https load balancer whose private key is a secret. The key must match the
//! certificate (else a clear error and nothing is created); the LB then serves TLS with it
//! (a client that trusts only this certificate completes the handshake); the secret cannot be
//! deleted while the LB uses it; an inline key is stored as the secret `<lb>-tls-key`; and the
//! key's PEM appears in no output and in no raw file of the data dir.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use nimbus_api::{CreateInstanceRequest, InstanceState};
use nimbus_testkit::{eventually, have, require, Cloud};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

fn deps() -> bool {
    require("root", nix::unistd::geteuid().is_root())
        && require("runc", have("runc"))
        && require("/bin/busybox", Path::new("/bin/busybox").exists())
        && require("nft", have("nft"))
}

fn run(cloud: &Cloud, args: &[&str]) -> Output {
    cloud.cli().args(args).output().expect("run nimbus")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(cloud: &Cloud, args: &[&str]) -> String {
    let o = run(cloud, args);
    assert!(o.status.success(), "nimbus {args:?} failed: {}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `GET /` over TLS to `lb.test` at 127.0.0.1:port, trusting only `cert_pem`.
async fn https_get(port: u16, cert_pem: &str) -> Option<String> {
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).ok()?)
        .resolve("lb.test", ([127, 0, 0, 1], port).into())
        .timeout(Duration::from_secs(3))
        .build()
        .ok()?;
    let r = client
        .get(format!("https://lb.test:{port}/"))
        .send()
        .await
        .ok()?;
    (r.status() == 200).then_some(())?;
    r.text().await.ok().map(|s| s.trim().to_string())
}

fn files_containing(dir: &Path, needle: &[u8], out: &mut Vec<std::path::PathBuf>) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            let mounted = mounts
                .lines()
                .any(|l| l.split(' ').nth(4) == Some(p.to_str().unwrap_or("")));
            if !mounted {
                files_containing(&p, needle, out);
            }
        } else if ft.is_file() {
            if let Ok(bytes) = std::fs::read(&p) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    out.push(p);
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_lb_key_from_a_secret() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    let port = 18_600 + u16::from(cloud.slot()) * 4;
    c.create_instance(
        &CreateInstanceRequest {
            name: "web1".into(),
            image: "busybox".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "mkdir -p /www && echo web1 > /www/index.html && exec httpd -f -p 8080 -h /www"
                    .into(),
            ],
            ..CreateInstanceRequest::default()
        },
        None,
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(30), || async {
        c.get_instance("web1")
            .await
            .ok()
            .filter(|i| i.status.state == InstanceState::Running)
    })
    .await
    .expect("web1 running");

    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["lb.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_pem, key_pem) = (cert.pem(), key.serialize_pem());
    let other_pem = rcgen::KeyPair::generate().unwrap().serialize_pem();
    let path = |n: &str| dir.path().join(n).to_str().unwrap().to_string();
    std::fs::write(path("cert.pem"), &cert_pem).unwrap();
    std::fs::write(path("key.pem"), &key_pem).unwrap();
    std::fs::write(path("other.pem"), &other_pem).unwrap();
    // A line from the middle of the key's base64: what must not leak.
    let needle = key_pem.lines().nth(1).unwrap().to_string();
    assert!(needle.len() > 40);

    ok(
        &cloud,
        &["secret", "create", "lbkey", "--from-file", &path("key.pem")],
    );
    ok(
        &cloud,
        &[
            "secret",
            "create",
            "wrong",
            "--from-file",
            &path("other.pem"),
        ],
    );
    let listen = format!("{port}:8080/https");
    let cert_file = path("cert.pem");
    let base = [
        "lb",
        "create",
        "web",
        "--listen",
        &listen,
        "--backend-label",
        "app=web",
        "--tls-cert",
        &cert_file,
    ];

    // A key that does not match: a clear error, nothing created (neither the LB nor a secret).
    let mut outputs = Vec::new();
    for extra in [
        ["--tls-key-secret", "wrong"],
        ["--tls-key", &path("other.pem")],
    ] {
        let o = run(&cloud, &[&base[..], &extra[..]].concat());
        assert!(!o.status.success(), "{}", text(&o));
        assert!(
            text(&o).contains("does not match the certificate"),
            "{}",
            text(&o)
        );
        outputs.push(text(&o));
    }
    assert!(c.list_lbs().await.unwrap().is_empty());
    assert!(c.get_secret("web-tls-key").await.is_err());

    // The key from the secret serves TLS.
    ok(
        &cloud,
        &[&base[..], &["--tls-key-secret", "lbkey"][..]].concat(),
    );
    let body = eventually(Duration::from_secs(30), || https_get(port, &cert_pem)).await;
    assert_eq!(body.as_deref(), Some("web1"));
    let o = run(&cloud, &["secret", "delete", "lbkey"]);
    assert!(
        !o.status.success() && text(&o).contains("load balancer web"),
        "{}",
        text(&o)
    );
    outputs.push(text(&o));

    // The inline form is kept as the secret web2-tls-key and serves too.
    let listen2 = format!("{}:8080/https", port + 1);
    ok(
        &cloud,
        &[
            "lb",
            "create",
            "web2",
            "--listen",
            &listen2,
            "--backend-label",
            "app=web",
            "--tls-cert",
            &cert_file,
            "--tls-key",
            &path("key.pem"),
        ],
    );
    let show = ok(&cloud, &["lb", "show", "web2", "-o", "json"]);
    assert!(show.contains("\"key_secret\": \"web2-tls-key\""), "{show}");
    outputs.push(show);
    assert!(c.get_secret("web2-tls-key").await.is_ok());
    let body = eventually(Duration::from_secs(30), || https_get(port + 1, &cert_pem)).await;
    assert_eq!(body.as_deref(), Some("web1"));

    outputs.push(ok(&cloud, &["events", "--all", "-o", "json"]));
    outputs.push(ok(&cloud, &["lb", "list", "-o", "json"]));
    for o in &outputs {
        assert!(!o.contains(&needle), "the private key leaked: {o}");
    }
    let mut found = Vec::new();
    files_containing(
        cloud.data_dir.parent().unwrap(),
        needle.as_bytes(),
        &mut found,
    );
    assert!(found.is_empty(), "the private key is in {found:?}");

    for lb in ["web", "web2"] {
        ok(&cloud, &["lb", "delete", lb]);
    }
    ok(&cloud, &["secret", "delete", "lbkey"]);
    cloud.shutdown();
}
