//! End to end: secrets through the real `nimbus` binary and real runc containers. A known
//! value reaches the container (as a read-only file on tmpfs and as an environment variable)
//! and appears nowhere else: not in `secret show`/`list`, events or error outputs, and not in
//! the raw bytes of any file of the data dir (raft.redb, logs, the agent's dirs). Deleting a
//! secret in use and an oversize secret are refused; a master-key rotation keeps the secrets
//! readable.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use nimbus_api::InstanceState;
use nimbus_client::Client;
use nimbus_testkit::{eventually, have, require, Cloud};

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

async fn wait_running(c: &Client, name: &str) {
    let got = eventually(Duration::from_secs(60), || async {
        c.get_instance(name)
            .await
            .ok()
            .filter(|i| i.status.state == InstanceState::Running)
    })
    .await;
    assert!(
        got.is_some(),
        "{name} never ran: {:?}",
        c.get_instance(name).await.map(|i| i.status)
    );
}

fn mount_points() -> Vec<PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(PathBuf::from)
        .collect()
}

/// Every regular file under `dir` whose raw bytes contain `needle`, not descending into
/// mount points (the container's overlay root and the secrets tmpfs, which are not disk
/// files of the data dir; the overlay's `upper/` is walked).
fn files_containing(dir: &Path, needle: &[u8], mounts: &[PathBuf], out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            if !mounts.contains(&p) {
                files_containing(&p, needle, mounts, out);
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
async fn secrets_reach_the_container_only() {
    if !deps() {
        return;
    }
    let mut cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let file_value = format!("file-secret-{tag}");
    let env_value = format!("env-secret-{tag}");
    let scratch = tempfile::tempdir().unwrap();
    let value_file = scratch.path().join("db.txt");
    std::fs::write(&value_file, &file_value).unwrap();

    let out = ok(
        &cloud,
        &[
            "secret",
            "create",
            "db",
            "--from-file",
            value_file.to_str().unwrap(),
        ],
    );
    assert!(
        out.contains(&format!("{} bytes", file_value.len())),
        "{out}"
    );
    // From standard input (keeps the value out of `ps` and the shell history).
    let mut child = cloud
        .cli()
        .args(["secret", "create", "token", "--from-file", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), env_value.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // --from-literal works too.
    ok(&cloud, &["secret", "create", "lit", "--from-literal", "x"]);
    ok(&cloud, &["secret", "delete", "lit"]);
    let mut outputs = vec![
        ok(&cloud, &["secret", "show", "db"]),
        ok(&cloud, &["secret", "show", "db", "-o", "json"]),
        ok(&cloud, &["secret", "list", "-o", "json"]),
    ];
    assert!(outputs[1].contains("\"size_bytes\""), "{}", outputs[1]);

    // Oversize: refused with a clear error, nothing created.
    let big = scratch.path().join("big");
    std::fs::write(&big, vec![b'x'; 64 * 1024 + 1]).unwrap();
    let o = run(
        &cloud,
        &[
            "secret",
            "create",
            "big",
            "--from-file",
            big.to_str().unwrap(),
        ],
    );
    assert!(!o.status.success());
    assert!(text(&o).contains("payload_too_large"), "{}", text(&o));
    assert!(c.get_secret("big").await.is_err());

    // Launch with a secret file and a secret variable; a missing secret is refused.
    let o = run(
        &cloud,
        &[
            "launch",
            "busybox",
            "nope",
            "--secret",
            "missing:/x",
            "--",
            "sleep",
            "1",
        ],
    );
    assert!(
        !o.status.success() && text(&o).contains("not_found"),
        "{}",
        text(&o)
    );
    ok(
        &cloud,
        &[
            "launch",
            "busybox",
            "app",
            "--secret",
            "db:/run/secrets/db",
            "--secret-env",
            "token:DB_TOKEN",
            "--",
            "sleep",
            "3600",
        ],
    );
    wait_running(&c, "app").await;
    let cat = ok(&cloud, &["exec", "app", "--", "cat", "/run/secrets/db"]);
    assert_eq!(cat, file_value);
    let env = ok(
        &cloud,
        &["exec", "app", "--", "sh", "-c", "echo \"$DB_TOKEN\""],
    );
    assert_eq!(env.trim_end(), env_value);
    let o = run(
        &cloud,
        &["exec", "app", "--", "sh", "-c", "echo x > /run/secrets/db"],
    );
    assert!(!o.status.success(), "the secret file must be read-only");
    // The bundle's secrets live on a tmpfs.
    let id = c.get_instance("app").await.unwrap().meta.id;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mountinfo
            .lines()
            .any(|l| l.contains(&format!("{id}/secrets ")) && l.contains(" - tmpfs ")),
        "no tmpfs for the secrets of {id}"
    );

    // In use: delete refused (409), and the error does not leak the value.
    let o = run(&cloud, &["secret", "delete", "db"]);
    assert!(!o.status.success());
    assert!(text(&o).contains("conflict"), "{}", text(&o));
    outputs.push(text(&o));
    assert!(c.get_secret("db").await.is_ok());

    // Rotation: keys change, the running container is unaffected and a new one still gets
    // the values.
    let key_before = std::fs::read(cloud.data_dir.join("master.key")).unwrap();
    let out = ok(&cloud, &["cluster", "rotate-master-key"]);
    assert!(out.contains("2 secrets re-wrapped"), "{out}");
    outputs.push(out);
    let key_after = std::fs::read(cloud.data_dir.join("master.key")).unwrap();
    assert_ne!(key_before, key_after);
    ok(
        &cloud,
        &[
            "launch",
            "busybox",
            "app2",
            "--secret",
            "db:/etc/app/db.conf",
            "--",
            "sleep",
            "3600",
        ],
    );
    wait_running(&c, "app2").await;
    assert_eq!(
        ok(&cloud, &["exec", "app2", "--", "cat", "/etc/app/db.conf"]),
        file_value
    );

    // A restart of the instance and a SIGKILL + restart of the cloud (the server reloads the
    // rotated key from master.key; the agent re-attaches) keep the secrets where they were.
    ok(&cloud, &["restart", "app"]);
    wait_running(&c, "app").await;
    assert_eq!(
        ok(&cloud, &["exec", "app", "--", "cat", "/run/secrets/db"]),
        file_value
    );
    cloud.restart().expect("restart nimbus up");
    let c = cloud.client();
    wait_running(&c, "app2").await;
    assert_eq!(
        ok(&cloud, &["exec", "app2", "--", "cat", "/etc/app/db.conf"]),
        file_value
    );
    ok(
        &cloud,
        &[
            "launch",
            "busybox",
            "app3",
            "--secret-env",
            "token:T",
            "--",
            "sleep",
            "3600",
        ],
    );
    wait_running(&c, "app3").await;
    let env = ok(&cloud, &["exec", "app3", "--", "sh", "-c", "echo \"$T\""]);
    assert_eq!(env.trim_end(), env_value);

    outputs.push(ok(&cloud, &["events", "--all", "-o", "json"]));
    outputs.push(ok(&cloud, &["show", "app", "-o", "json"]));
    for out in &outputs {
        assert!(
            !out.contains(&file_value) && !out.contains(&env_value),
            "a secret value leaked into an output: {out}"
        );
    }

    // Nowhere in the raw bytes of the data dir (raft.redb, agent state, bundles) or the log.
    let root = cloud.data_dir.parent().unwrap().to_path_buf();
    let mounts = mount_points();
    for needle in [&file_value, &env_value] {
        let mut found = Vec::new();
        files_containing(&root, needle.as_bytes(), &mounts, &mut found);
        assert!(found.is_empty(), "{needle} found in {found:?}");
    }
    assert!(
        root.join("data/raft").read_dir().is_ok(),
        "no raft dir to scan"
    );

    // Once no instance uses it, the secret can be deleted; the tmpfs goes with the instance.
    for name in ["app", "app2", "app3"] {
        ok(&cloud, &["delete", name]);
    }
    ok(&cloud, &["secret", "delete", "db"]);
    assert!(!std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(&format!("{id}/secrets ")));
    cloud.shutdown();
}
