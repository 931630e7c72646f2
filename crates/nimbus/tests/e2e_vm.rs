//! End to end with a real QEMU guest through the product path: `nimbus up`, `nimbus launch
//! busybox vm1 --vm ...`, user-data, exec, HTTP from the host, stop/start keeping the disk,
//! SIGKILL of nimbus with the VM re-attached (same QEMU PID), delete leaving nothing. Runs under
//! TCG here (the `auto` accelerator must pick it: nested KVM does not boot a guest).

use std::path::Path;
use std::time::Duration;

use nimbus_api::{InstanceState, InstanceType};
use nimbus_testkit::{eventually, have, http_get, pid_alive, require, Cloud};

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_nimbus"))
}

fn deps() -> bool {
    let kernel = std::env::var_os("NIMBUS_KERNEL_DIR").map_or_else(
        || Path::new("/var/lib/nimbus/kernel").to_path_buf(),
        Into::into,
    );
    require("root", nix::unistd::geteuid().is_root())
        && require("qemu-system-x86_64", have("qemu-system-x86_64"))
        && require("qemu-img", have("qemu-img"))
        && require(
            "guest kernel (scripts/setup-vm)",
            kernel.join("vmlinuz").exists(),
        )
        && require("/bin/busybox", Path::new("/bin/busybox").exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_lifecycle_end_to_end() {
    if !deps() {
        return;
    }
    let mut cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    // The node reports VM support once its accelerator probe has finished: TCG here.
    let node = eventually(Duration::from_secs(120), || async {
        c.list_nodes()
            .await
            .ok()?
            .into_iter()
            .find(|n| n.capabilities.vms)
    })
    .await
    .unwrap_or_else(|| {
        let log = cloud.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "the node must report VM support; nimbus log (last lines, newest first):\n{}",
            tail.join("\n")
        )
    });
    if Path::new("/dev/kvm").exists() && std::env::var("NIMBUS_EXPECT_KVM").is_err() {
        assert_eq!(
            node.capabilities.accelerator.as_deref(),
            Some("tcg"),
            "auto must fall back to TCG where KVM cannot boot a guest"
        );
    }

    let tmp = tempfile::tempdir().unwrap();
    let ud = tmp.path().join("init.sh");
    std::fs::write(&ud, "#!/bin/sh\necho user-data-marker-$((6*7))\nmkdir -p /www\necho vm-page > /www/index.html\n").unwrap();
    let out = cloud
        .cli()
        .args([
            "launch",
            "busybox",
            "vm1",
            "--vm",
            "--cpus",
            "1",
            "--memory",
            "256M",
            "--disk",
            "1G",
            "--user-data",
        ])
        .arg(&ud)
        .args(["--", "httpd", "-f", "-p", "8080", "-h", "/www"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "launch: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let vm = c.get_instance("vm1").await.unwrap();
    assert_eq!(vm.spec.instance_type, InstanceType::Vm);
    assert_eq!(vm.status.state, InstanceState::Running);
    assert_eq!(
        vm.status.accelerator.as_deref(),
        node.capabilities.accelerator.as_deref()
    );
    let ip = vm.status.ip.clone().unwrap();
    let qemu_pid = vm.status.pid.unwrap();

    // The user-data script ran once at first boot; its output is on the console log.
    let logs = eventually(Duration::from_secs(90), || async {
        c.logs("vm1", None)
            .await
            .ok()
            .filter(|l| l.contains("user-data-marker-42"))
    })
    .await;
    assert!(
        logs.is_some(),
        "console log must show the user-data marker: {:?}",
        c.logs("vm1", None)
            .await
            .map(|l| l.chars().rev().take(2000).collect::<String>())
    );

    // exec through the guest agent returns output and exit code.
    let r = eventually(Duration::from_secs(60), || async {
        c.exec(
            "vm1",
            vec![
                "sh".into(),
                "-c".into(),
                "echo inside-$(hostname); exit 4".into(),
            ],
        )
        .await
        .ok()
    })
    .await
    .expect("exec");
    assert_eq!(r.exit_code, 4);
    assert_eq!(r.stdout.trim(), "inside-vm1");
    let o = cloud
        .cli()
        .args(["exec", "vm1", "--", "sh", "-c", "exit 9"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(9));

    // The interactive console: a shell on the serial line answers through
    // client -> server -> agent -> QEMU chardev -> guest ttyS0 and back.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut con = c.console("vm1").await.expect("console attaches");
        con.write_all(b"\necho console-works-$((40+2))\n")
            .await
            .unwrap();
        let mut seen = String::new();
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            let mut buf = [0u8; 4096];
            loop {
                let n = con.read(&mut buf).await.unwrap_or(0);
                if n == 0 {
                    return false;
                }
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
                if seen.contains("console-works-42") {
                    return true;
                }
            }
        })
        .await
        .unwrap_or(false);
        assert!(
            found,
            "the console shell must run the typed command: {seen:?}"
        );
    }
    // Containers have no interactive console: a clear 409.
    let e = c.console("nope-not-here").await.unwrap_err();
    assert_eq!(
        e.api().map(|a| a.code),
        Some(nimbus_api::ErrorCode::NotFound)
    );

    // The service in the VM answers from the host.
    let page = eventually(Duration::from_secs(60), || async {
        http_get(&ip, 8080).filter(|p| p.contains("vm-page"))
    })
    .await;
    assert!(page.is_some(), "httpd in the VM must answer on {ip}:8080");

    // A file written in the VM survives stop/start.
    let r = c
        .exec(
            "vm1",
            vec![
                "sh".into(),
                "-c".into(),
                "echo kept > /root/persist; sync".into(),
            ],
        )
        .await
        .unwrap();
    assert_eq!(r.exit_code, 0, "{r:?}");
    let out = cloud.cli().args(["stop", "vm1"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let gone = eventually(Duration::from_secs(15), || async {
        (!pid_alive(qemu_pid)).then_some(())
    })
    .await;
    assert!(gone.is_some(), "stop must end QEMU");
    let out = cloud.cli().args(["start", "vm1"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = eventually(Duration::from_secs(90), || async {
        c.exec("vm1", vec!["cat".into(), "/root/persist".into()])
            .await
            .ok()
            .filter(|r| r.exit_code == 0)
    })
    .await;
    assert_eq!(r.expect("exec after start").stdout.trim(), "kept");
    let logs = c.logs("vm1", None).await.unwrap();
    assert_eq!(
        logs.matches("user-data-marker-42").count(),
        1,
        "user-data runs on first boot only"
    );

    // SIGKILL nimbus: the VM keeps running and is re-attached with the same QEMU PID.
    let pid = c.get_instance("vm1").await.unwrap().status.pid.unwrap();
    cloud.kill9();
    assert!(pid_alive(pid));
    cloud.restart().expect("restart nimbus");
    let c = cloud.client();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = c.get_instance("vm1").await.unwrap();
    assert_eq!(again.status.state, InstanceState::Running);
    assert_eq!(again.status.pid, Some(pid), "re-attached, not restarted");
    let r = eventually(Duration::from_secs(30), || async {
        c.exec("vm1", vec!["echo".into(), "still".into()])
            .await
            .ok()
    })
    .await
    .expect("exec after re-attach");
    assert_eq!(r.stdout.trim(), "still");

    // Delete leaves no process and no files.
    let id = again.meta.id.clone();
    let out = cloud.cli().args(["delete", "vm1"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pid_alive(pid), "QEMU must be gone");
    let leftovers: Vec<_> = walk(&cloud.data_dir.join("agent"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(&id))
        .collect();
    assert!(leftovers.is_empty(), "files left behind: {leftovers:?}");
    cloud.shutdown();
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            out.push(p.clone());
            if p.is_dir() && !p.is_symlink() {
                out.extend(walk(&p));
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_bad_input() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    let post = |body: String| {
        c.raw(
            reqwest::Method::POST,
            "/v1/projects/default/instances",
            Some(body),
            Some(&cloud.token),
        )
    };
    // Memory under 128 MiB.
    let (st, text) = post(r#"{"name":"v1","image":"busybox","type":"vm","memory":"64M"}"#.into())
        .await
        .unwrap();
    assert_eq!(st.as_u16(), 422, "{text}");
    assert!(text.contains(r#""field":"memory""#), "{text}");
    // User-data over 64 KiB.
    let big = "x".repeat(65 * 1024);
    let (st, text) = post(format!(
        r#"{{"name":"v2","image":"busybox","type":"vm","user_data":"{big}"}}"#
    ))
    .await
    .unwrap();
    assert_eq!(st.as_u16(), 422, "{text}");
    assert!(text.contains(r#""field":"user_data""#), "{text}");
    // A disk smaller than the image.
    let (st, text) = post(r#"{"name":"v3","image":"busybox","type":"vm","disk":"4K"}"#.into())
        .await
        .unwrap();
    assert_eq!(st.as_u16(), 422, "{text}");
    assert!(text.contains(r#""field":"disk""#), "{text}");
    // Fractional vCPUs.
    let (st, _) = post(r#"{"name":"v4","image":"busybox","type":"vm","cpus":0.5}"#.into())
        .await
        .unwrap();
    assert_eq!(st.as_u16(), 422);
    assert!(
        c.list_instances().await.unwrap().is_empty(),
        "nothing was created"
    );
    cloud.shutdown();
}
