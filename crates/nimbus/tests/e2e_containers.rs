//! End to end: the real `nimbus` binary (`nimbus up`), real runc containers, driven through the
//! CLI and the typed client.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

use nimbus_api::{CreateInstanceRequest, ErrorCode, InstanceState, RestartPolicy};
use nimbus_client::Client;
use nimbus_testkit::{eventually, have, http_get, pid_alive, require, Cloud};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

fn deps() -> bool {
    require("root", nix::unistd::geteuid().is_root())
        && require("runc", have("runc"))
        && require("/bin/busybox", Path::new("/bin/busybox").exists())
}

fn run(cloud: &Cloud, args: &[&str]) -> Output {
    cloud.cli().args(args).output().expect("run nimbus")
}

fn ok(cloud: &Cloud, args: &[&str]) -> String {
    let o = run(cloud, args);
    assert!(
        o.status.success(),
        "nimbus {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn wait_state(c: &Client, name: &str, state: InstanceState) -> nimbus_api::Instance {
    let got = eventually(Duration::from_secs(30), || async {
        c.get_instance(name)
            .await
            .ok()
            .filter(|i| i.status.state == state)
    })
    .await;
    match got {
        Some(i) => i,
        None => panic!(
            "{name} never reached {state:?}: {:?}",
            c.get_instance(name).await.map(|i| i.status)
        ),
    }
}

fn mounts_mentioning(id: &str) -> usize {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(id))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn container_lifecycle_end_to_end() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();

    // launch busybox running httpd, serving a page we put there with exec.
    let out = ok(
        &cloud,
        &[
            "launch", "busybox", "web", "--memory", "64M", "--cpus", "0.5", "--", "httpd", "-f",
            "-p", "8080", "-h", "/var/www",
        ],
    );
    assert!(out.contains("running"), "{out}");
    let web = c.get_instance("web").await.unwrap();
    let ip = web.status.ip.clone().expect("ip");
    let id = web.meta.id.clone();

    let o = run(
        &cloud,
        &[
            "exec",
            "web",
            "--",
            "sh",
            "-c",
            "echo hello-from-nimbus > /var/www/index.html; echo done; echo oops >&2; exit 7",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(7),
        "exec must return the command's exit code"
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout), "done\n");
    assert_eq!(String::from_utf8_lossy(&o.stderr), "oops\n");

    let page = eventually(Duration::from_secs(10), || async {
        http_get(&ip, 8080).filter(|p| p.contains("hello-from-nimbus"))
    })
    .await;
    assert!(
        page.is_some(),
        "httpd in the container must answer from the host on {ip}:8080"
    );

    // Resource limits reach the cgroup.
    let mem_limit = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/nimbus/{id}/memory.limit_in_bytes"
    ))
    .unwrap_or_default();
    assert_eq!(mem_limit.trim(), (64u64 << 20).to_string());

    // logs shows the output of a process.
    ok(
        &cloud,
        &[
            "launch",
            "busybox",
            "talker",
            "--",
            "sh",
            "-c",
            "echo line-one; echo line-two >&2; sleep 3600",
        ],
    );
    let logs = eventually(Duration::from_secs(10), || async {
        c.logs("talker", None)
            .await
            .ok()
            .filter(|l| l.contains("line-two"))
    })
    .await
    .expect("logs");
    assert!(logs.contains("line-one\n"), "{logs}");
    let cli_logs = ok(&cloud, &["logs", "talker", "--tail", "1"]);
    assert_eq!(cli_logs.lines().count(), 1, "{cli_logs}");

    // The seccomp filter is on: user namespaces (and the other denied calls) fail with EPERM.
    let o = run(
        &cloud,
        &[
            "exec",
            "talker",
            "--",
            "sh",
            "-c",
            "grep Seccomp: /proc/self/status; unshare -U true; echo rc=$?",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("Seccomp:\t2"), "no seccomp filter: {out}");
    assert!(out.contains("rc=1"), "unshare must be denied: {out}");

    // A console log over 16 MiB is rotated: one older generation is kept, writing goes on in
    // the truncated file, and `logs` shows both.
    ok(
        &cloud,
        &[
            "launch",
            "busybox",
            "chatty",
            "--",
            "sh",
            "-c",
            "head -c 17000000 /dev/zero | tr '\\0' x; echo; echo first-after; sleep 2; echo second-after; sleep 3600",
        ],
    );
    let chatty = c.get_instance("chatty").await.unwrap().meta.id;
    let log = cloud
        .data_dir
        .join(format!("agent/containers/{chatty}/console.log"));
    let rotated = eventually(Duration::from_secs(30), || async {
        let old = std::fs::metadata(log.with_extension("log.1")).ok()?;
        let cur = std::fs::read_to_string(&log).ok()?;
        (old.len() > 16 << 20 && cur.contains("second-after")).then_some(cur)
    })
    .await
    .expect("console.log.1 over 16 MiB and console.log with the later output");
    assert!(
        rotated.len() < 1 << 20,
        "current log after rotation: {} bytes",
        rotated.len()
    );
    let tail = ok(&cloud, &["logs", "chatty", "--tail", "2"]);
    assert!(tail.ends_with("second-after\n"), "{tail}");
    ok(&cloud, &["delete", "chatty"]);

    // stop / start keep the rootfs.
    let out = ok(&cloud, &["stop", "web"]);
    assert!(out.contains("stopped"), "{out}");
    assert!(
        http_get(&ip, 8080).is_none_or(|p| !p.contains("hello")),
        "stopped container must not serve"
    );
    ok(&cloud, &["start", "web"]);
    let page = eventually(Duration::from_secs(10), || async {
        http_get(&ip, 8080).filter(|p| p.contains("hello-from-nimbus"))
    })
    .await;
    assert!(
        page.is_some(),
        "files written before stop must survive stop/start"
    );

    // restart gives a new PID.
    let before = c.get_instance("web").await.unwrap().status.pid;
    ok(&cloud, &["restart", "web"]);
    let after = c.get_instance("web").await.unwrap().status.pid;
    assert_ne!(before, after);

    // The restart policy revives a crashing container.
    ok(
        &cloud,
        &[
            "launch",
            "busybox",
            "crasher",
            "--restart",
            "on-failure",
            "--no-wait",
            "--",
            "sh",
            "-c",
            "sleep 0.3; exit 3",
        ],
    );
    let revived = eventually(Duration::from_secs(30), || async {
        c.get_instance("crasher")
            .await
            .ok()
            .filter(|i| i.status.restart_count >= 2)
    })
    .await;
    let revived = revived.expect("on-failure must restart a crashing container");
    assert_eq!(revived.status.exit_code, Some(3));
    // `never` leaves the exit code and stops.
    ok(
        &cloud,
        &[
            "launch",
            "busybox",
            "oneshot",
            "--no-wait",
            "--",
            "sh",
            "-c",
            "exit 5",
        ],
    );
    let done = wait_state(&c, "oneshot", InstanceState::Failed).await;
    assert_eq!(done.status.exit_code, Some(5));
    assert_eq!(done.status.restart_count, 0);

    // list -o json carries the contract fields.
    let json: serde_json::Value =
        serde_json::from_str(&ok(&cloud, &["list", "-o", "json"])).unwrap();
    let arr = json.as_array().unwrap();
    let w = arr.iter().find(|v| v["name"] == "web").unwrap();
    for k in [
        "name",
        "type",
        "state",
        "node",
        "ip",
        "cpus",
        "memory_bytes",
    ] {
        assert!(w.get(k).is_some(), "list -o json lacks {k}: {w}");
    }
    assert_eq!(w["memory_bytes"], 64 << 20);

    // events record the lifecycle.
    let events = c.events(Some("default"), 0).await.unwrap();
    assert!(
        events
            .iter()
            .any(|e| e.name == "crasher" && e.reason == "Restarted"),
        "{events:?}"
    );

    // delete leaves nothing behind.
    let pid = c.get_instance("web").await.unwrap().status.pid.unwrap();
    let out = ok(&cloud, &["delete", "web"]);
    assert!(out.contains("deleted"));
    assert!(!pid_alive(pid), "container process must be gone");
    assert_eq!(mounts_mentioning(&id), 0, "no mounts may remain");
    assert!(
        !Path::new(&format!("/sys/fs/cgroup/memory/nimbus/{id}")).exists(),
        "no cgroup may remain"
    );
    assert!(
        !cloud.data_dir.join("agent/containers").join(&id).exists(),
        "no files may remain"
    );
    let e = c.get_instance("web").await.unwrap_err();
    assert_eq!(e.api().unwrap().code, ErrorCode::NotFound);
    let o = run(&cloud, &["stop", "web"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error: ") && err.lines().count() == 1,
        "one readable line: {err}"
    );
    cloud.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_and_restart_loses_nothing_and_keeps_containers_running() {
    if !deps() {
        return;
    }
    let mut cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    for i in 0..20 {
        let req = CreateInstanceRequest {
            name: format!("keep-{i}"),
            image: "busybox".into(),
            memory: Some(serde_json::json!("16M")),
            cpus: Some(0.1),
            command: vec!["sleep".into(), "3600".into()],
            ..Default::default()
        };
        c.create_instance(&req, None).await.unwrap();
    }
    let mut pids = BTreeMap::new();
    for i in 0..20 {
        let inst = wait_state(&c, &format!("keep-{i}"), InstanceState::Running).await;
        pids.insert(
            inst.meta.name.clone(),
            (inst.status.pid.unwrap(), inst.meta.id.clone()),
        );
    }
    let nimbus_pid = cloud.pid().unwrap();
    cloud.kill9();
    assert!(!pid_alive(nimbus_pid));
    for (name, (pid, _)) in &pids {
        assert!(
            pid_alive(*pid),
            "{name} must keep running while nimbus is down"
        );
    }
    cloud
        .restart()
        .expect("nimbus restarts on the same data dir");
    let c = cloud.client();
    let list = c.list_instances().await.unwrap();
    assert_eq!(list.len(), 20, "every acknowledged create survives");
    // After the agent has re-attached, the same PIDs are reported and nothing was restarted.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (name, (pid, id)) in &pids {
        let i = c.get_instance(name).await.unwrap();
        assert_eq!(i.status.state, InstanceState::Running, "{name}");
        assert_eq!(i.status.pid, Some(*pid), "{name} must keep its PID");
        assert_eq!(&i.meta.id, id);
        assert_eq!(i.status.restart_count, 0);
        assert!(pid_alive(*pid));
    }
    // The cloud still works after the restart.
    let r = c
        .exec("keep-0", vec!["echo".into(), "alive".into()])
        .await
        .unwrap();
    assert_eq!(r.stdout, "alive\n");
    cloud.shutdown();
    for (name, (pid, _)) in &pids {
        assert!(!pid_alive(*pid), "{name} must be gone after delete");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::many_single_char_names)]
async fn bad_input_gets_clear_errors_and_changes_nothing() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    let path = "/v1/projects/default/instances";
    let check = |status: u16, body: &str, code: &str, field: Option<&str>| {
        let v: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("error body must be JSON ({e}): {body}"));
        assert_eq!(v["error"]["code"], code, "{body}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{body}"
        );
        if let Some(f) = field {
            assert_eq!(v["error"]["field"], f, "{body}");
        }
        let _ = status;
    };
    let post = |body: &str| {
        c.raw(
            reqwest::Method::POST,
            path,
            Some(body.to_string()),
            Some(&cloud.token),
        )
    };
    let cases: Vec<(&str, u16, &str, Option<&str>)> = vec![
        (
            r#"{"name":"Bad_Name","image":"busybox"}"#,
            422,
            "invalid_argument",
            Some("name"),
        ),
        (
            r#"{"name":"-x","image":"busybox"}"#,
            422,
            "invalid_argument",
            Some("name"),
        ),
        (
            r#"{"name":"ok","image":"busybox","memory":"12Q"}"#,
            422,
            "invalid_argument",
            Some("memory"),
        ),
        (
            r#"{"name":"ok","image":"busybox","memory":"-1M"}"#,
            422,
            "invalid_argument",
            Some("memory"),
        ),
        (
            r#"{"name":"ok","image":"busybox","cpus":0}"#,
            422,
            "invalid_argument",
            Some("cpus"),
        ),
        (
            r#"{"name":"ok","image":"busybox","cpus":-2}"#,
            422,
            "invalid_argument",
            Some("cpus"),
        ),
        (
            r#"{"name":"ok","image":"busybox","memory":0}"#,
            422,
            "invalid_argument",
            Some("memory"),
        ),
        (
            r#"{"name":"ok","image":"no-such-image"}"#,
            422,
            "invalid_argument",
            Some("image"),
        ),
        (
            r#"{"name":"ok","image":"busybox","colour":"red"}"#,
            400,
            "bad_request",
            Some("colour"),
        ),
        (
            r#"{"name":"ok","image":"busybox","memory":"1T"}"#,
            409,
            "unschedulable",
            None,
        ),
        (
            r#"{"name":"ok","image":"busybox","constraints":["gpu=yes"]}"#,
            422,
            "invalid_argument",
            Some("constraints[0]"),
        ),
        (
            r#"{"name":"ok","image":"busybox","constraints":["disk=="]}"#,
            422,
            "invalid_argument",
            Some("constraints[0]"),
        ),
        (
            r#"{"name":"ok","image":"busybox","priority_class":"urgent"}"#,
            422,
            "invalid_argument",
            Some("priority_class"),
        ),
        (
            r#"{"name":"ok","image":"busybox","anti_affinity":true}"#,
            422,
            "invalid_argument",
            Some("anti_affinity"),
        ),
        (r"not json", 400, "bad_request", None),
    ];
    for (body, status, code, field) in cases {
        let (st, text) = post(body).await.unwrap();
        assert_eq!(st.as_u16(), status, "{body} -> {text}");
        check(status, &text, code, field);
    }
    // The unschedulable message says why, per node.
    let (_, text) = post(r#"{"name":"ok","image":"busybox","memory":"1T"}"#)
        .await
        .unwrap();
    assert!(
        text.contains("0 of 1 nodes fit: 1 insufficient memory") && text.contains("node1"),
        "{text}"
    );
    // Oversized body.
    let big = format!(
        r#"{{"name":"ok","image":"busybox","env":{{"A":"{}"}}}}"#,
        "x".repeat(2 << 20)
    );
    // (A fresh client: the server answers 413 without reading the rest and closes that
    // connection, which must not poison the pooled connections of the other checks.)
    let (st, text) = Client::new(&cloud.url, &cloud.token, "default")
        .raw(reqwest::Method::POST, path, Some(big), Some(&cloud.token))
        .await
        .unwrap();
    assert_eq!(st.as_u16(), 413, "{}", &text[..text.len().min(200)]);
    check(413, &text, "payload_too_large", None);
    // Auth.
    let (st, text) = c.raw(reqwest::Method::GET, path, None, None).await.unwrap();
    assert_eq!(st.as_u16(), 401);
    check(401, &text, "unauthorized", None);
    let (st, _) = c
        .raw(reqwest::Method::GET, path, None, Some("wrong"))
        .await
        .unwrap();
    assert_eq!(st.as_u16(), 401);
    let (st, _) = c
        .raw(reqwest::Method::GET, "/healthz", None, None)
        .await
        .unwrap();
    assert_eq!(st.as_u16(), 200, "healthz needs no token");
    let (st, text) = c
        .raw(
            reqwest::Method::GET,
            "/v1/openapi.json",
            None,
            Some(&cloud.token),
        )
        .await
        .unwrap();
    assert_eq!(st.as_u16(), 200);
    assert!(text.contains("/v1/projects/{project}/instances"));
    // Nothing was created by any of that.
    assert!(c.list_instances().await.unwrap().is_empty());
    // Duplicate name.
    let (st, _) = post(r#"{"name":"dup","image":"busybox","command":["sleep","3600"]}"#)
        .await
        .unwrap();
    assert_eq!(st.as_u16(), 201);
    let (st, text) = post(r#"{"name":"dup","image":"busybox"}"#).await.unwrap();
    assert_eq!(st.as_u16(), 409);
    check(409, &text, "already_exists", Some("name"));
    // Idempotency-Key: a retried create returns the same instance.
    let req = CreateInstanceRequest {
        name: "idem".into(),
        image: "busybox".into(),
        command: vec!["sleep".into(), "3600".into()],
        restart: RestartPolicy::Never,
        ..Default::default()
    };
    let a = c.create_instance(&req, Some("key-1")).await.unwrap();
    let b = c.create_instance(&req, Some("key-1")).await.unwrap();
    assert_eq!(a.meta.id, b.meta.id);
    // Optimistic concurrency.
    let cur = c.get_instance("dup").await.unwrap();
    let (st, text) = c
        .raw(
            reqwest::Method::POST,
            "/v1/projects/default/instances/dup/stop",
            Some(format!(r#"{{"version":{}}}"#, cur.meta.version + 100)),
            Some(&cloud.token),
        )
        .await
        .unwrap();
    assert_eq!(st.as_u16(), 409, "{text}");
    check(409, &text, "version_conflict", Some("version"));
    // Operations on a deleted instance: 404.
    c.delete_instance("dup").await.unwrap();
    eventually(Duration::from_secs(30), || async {
        c.get_instance("dup").await.err()
    })
    .await
    .expect("deleted");
    for action in ["start", "stop", "restart"] {
        let e = c.instance_action("dup", action).await.unwrap_err();
        assert_eq!(e.api().unwrap().code, ErrorCode::NotFound, "{action}");
    }
    // Unknown project.
    let e = c.with_project("nope").list_instances().await.unwrap_err();
    assert_eq!(e.api().unwrap().code, ErrorCode::NotFound);
    // CLI: malformed size and bad names are one readable line and a non-zero exit.
    for args in [
        &["launch", "busybox", "x1", "--memory", "lots"][..],
        &["launch", "busybox", "Bad"][..],
        &["launch", "nosuch", "x2"][..],
    ] {
        let o = run(&cloud, args);
        assert!(!o.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.starts_with("error: ") && err.trim_end().lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    cloud.shutdown();
}

#[test]
fn corrupt_or_foreign_data_dir_is_a_clear_startup_error() {
    let tmp = tempfile::tempdir().unwrap();
    // Foreign: a directory with unrelated files.
    std::fs::write(tmp.path().join("important.txt"), "user data").unwrap();
    let o = std::process::Command::new(bin())
        .args(["up", "--data-dir"])
        .arg(tmp.path())
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not a nimbus data directory"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(
        std::fs::read_to_string(tmp.path().join("important.txt")).unwrap(),
        "user data"
    );
    // Corrupt: a nimbus data dir whose Raft store is garbage.
    let d = tmp.path().join("corrupt");
    std::fs::create_dir_all(d.join("raft")).unwrap();
    std::fs::write(d.join("NIMBUS_DATA_DIR"), "nimbus-data-v1\n").unwrap();
    std::fs::write(d.join("raft/raft.redb"), vec![0x42u8; 8192]).unwrap();
    let o = std::process::Command::new(bin())
        .args(["up", "--data-dir"])
        .arg(&d)
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error: ") || err.contains("\nerror: "),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_import_oci_and_docker_save_then_launch() {
    use nimbus_image::testutil::{self, DockerSaveFormat, FixtureConfig, LayerEntry};
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    let tmp = tempfile::tempdir().unwrap();
    // A two-layer image: busybox below, a file and a default command on top.
    let store = nimbus_image::ImageStore::open(&tmp.path().join("store")).unwrap();
    let bb = store.build_busybox(Path::new("/bin/busybox")).unwrap();
    let base = testutil::layer_from_dir(&store.unpacked_layer(&bb.layers[0]).unwrap()).unwrap();
    let top = testutil::layer_tar(&[LayerEntry::file(
        "hello.txt",
        b"hello from an imported image\n",
    )])
    .unwrap();
    let cfg = FixtureConfig {
        name: Some("registry.example/team/greeter:1.0".into()),
        cmd: vec![
            "sh".into(),
            "-c".into(),
            "cat /hello.txt; echo \"greeting=$GREETING\"; sleep 3600".into(),
        ],
        env: vec!["PATH=/bin".into(), "GREETING=hi".into()],
        gzip_layers: true,
        ..FixtureConfig::default()
    };
    let oci = tmp.path().join("greeter-oci.tar");
    testutil::write_oci_layout_tarball_layers(&[base.clone(), top.clone()], &oci, &cfg).unwrap();
    let docker = tmp.path().join("greeter-docker.tar");
    let dcfg = FixtureConfig {
        name: Some("docker-greeter:latest".into()),
        docker_format: DockerSaveFormat::Legacy,
        gzip_layers: false,
        ..cfg.clone()
    };
    testutil::write_docker_save_tarball_layers(&[base, top], &docker, &dcfg).unwrap();

    let out = ok(&cloud, &["image", "import", oci.to_str().unwrap()]);
    assert!(out.contains("imported team-greeter sha256:"), "{out}");
    let out = ok(&cloud, &["image", "import", docker.to_str().unwrap()]);
    assert!(out.contains("imported docker-greeter"), "{out}");
    let images: serde_json::Value =
        serde_json::from_str(&ok(&cloud, &["image", "list", "-o", "json"])).unwrap();
    let names: Vec<&str> = images
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["name"].as_str())
        .collect();
    for n in ["busybox", "team-greeter", "docker-greeter"] {
        assert!(names.contains(&n), "{names:?}");
    }
    for (image, inst) in [("team-greeter", "g1"), ("docker-greeter", "g2")] {
        ok(
            &cloud,
            &["launch", image, inst, "--env", "GREETING=overridden"],
        );
        let logs = eventually(Duration::from_secs(10), || async {
            c.logs(inst, None)
                .await
                .ok()
                .filter(|l| l.contains("greeting="))
        })
        .await
        .expect("logs");
        assert!(logs.contains("hello from an imported image"), "{logs}");
        assert!(
            logs.contains("greeting=overridden"),
            "user env overrides the image's: {logs}"
        );
    }
    // A file that is not an image is refused with one line.
    let junk = tmp.path().join("junk.tar");
    std::fs::write(&junk, b"this is not a tarball").unwrap();
    let o = run(&cloud, &["image", "import", junk.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("error: ") && err.contains("image tarball"),
        "{err}"
    );
    cloud.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_are_group_committed_and_all_acknowledged() {
    if !deps() {
        return;
    }
    let mut cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.create_project(&format!("p{i}")).await
        }));
    }
    for t in tasks {
        t.await
            .unwrap()
            .expect("every concurrent create is acknowledged");
    }
    // Acknowledged means durable: SIGKILL and restart, all 64 are still there.
    cloud.kill9();
    cloud.restart().unwrap();
    let names: Vec<String> = cloud
        .client()
        .list_projects()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.meta.name)
        .collect();
    for i in 0..64 {
        assert!(names.contains(&format!("p{i}")), "p{i} lost: {names:?}");
    }
    cloud.shutdown();
}
