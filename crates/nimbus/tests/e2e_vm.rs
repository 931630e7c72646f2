//! End to end with a real QEMU guest through the product path: `nimbus up`, `nimbus launch
//! busybox vm1 --vm ...`, user-data, exec, HTTP from the host, stop/start keeping the disk,
//! SIGKILL of nimbus with the VM re-attached (same QEMU PID), delete leaving nothing. Runs under
//! TCG here (the `auto` accelerator must pick it: nested KVM does not boot a guest).
//!
//! Around the accelerator probe and boot: a VM launched right after `nimbus up` waits for the
//! probe instead of being refused; the probe's QEMU dies with a SIGKILLed `nimbus up`; a VM is
//! `starting` until its guest agent answers, so `exec` right after `launch` works; a VM without
//! a command stays up. Tests that need the probe to run get a fresh, empty probe cache
//! (`NIMBUS_CACHE_DIR`); the others share the host's.

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

/// PIDs of accelerator probe QEMUs whose command line names `data_dir`.
fn probe_pids(data_dir: &Path) -> Vec<u32> {
    let needle = data_dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            (cmdline.contains("nimbus.probe=1") && cmdline.contains(&needle)).then_some(pid)
        })
        .collect()
}

/// A cloud whose VM accelerator probe starts from an empty cache (it must probe).
/// `nimbus up` with an empty probe cache in `cache`, whose accelerator probe takes at least
/// `PROBE_DELAY`: a `qemu-system-x86_64` first on its `PATH` (written into `cache`) sleeps
/// that long before it runs the real QEMU when it is the probe. Where KVM fails at once (no
/// VMX in a nested guest) the probe would otherwise be over before a test could watch it.
fn cloud_with_fresh_probe_cache(cache: &Path) -> Cloud {
    let real = which("qemu-system-x86_64").expect("qemu-system-x86_64 on PATH");
    let wrappers = cache.join("bin");
    std::fs::create_dir_all(&wrappers).unwrap();
    let wrapper = wrappers.join("qemu-system-x86_64");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$*\" in *nimbus.probe=1*) sleep {};; esac\nexec {} \"$@\"\n",
            PROBE_DELAY.as_secs(),
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        wrappers.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let cache = cache.to_string_lossy().into_owned();
    Cloud::start_with_env(
        bin(),
        &[
            ("NIMBUS_CACHE_DIR", cache.as_str()),
            ("PATH", path.as_str()),
        ],
    )
    .expect("nimbus up")
}

/// How long the probe takes at least in [`cloud_with_fresh_probe_cache`].
const PROBE_DELAY: Duration = Duration::from_secs(4);

fn which(tool: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

fn cli_ok(out: &std::process::Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_qemu_dies_with_a_sigkilled_nimbus_up() {
    if !deps() {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let mut cloud = cloud_with_fresh_probe_cache(cache.path());
    if !Path::new("/dev/kvm").exists() {
        // Nothing to probe: TCG at once, and no probe QEMU ever.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(probe_pids(&cloud.data_dir).is_empty());
        return;
    }
    let probes = eventually(Duration::from_secs(30), || async {
        Some(probe_pids(&cloud.data_dir)).filter(|p| !p.is_empty())
    })
    .await
    .expect("the accelerator probe QEMU must run after nimbus up");
    cloud.kill9();
    let gone = eventually(Duration::from_secs(2), || async {
        probe_pids(&cloud.data_dir).is_empty().then_some(())
    })
    .await;
    let left = probe_pids(&cloud.data_dir);
    for pid in &left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(
        gone.is_some(),
        "probe QEMU {probes:?} outlived the SIGKILLed nimbus up (left: {left:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_launched_right_after_up_waits_for_the_probe() {
    if !deps() {
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let cloud = cloud_with_fresh_probe_cache(cache.path());
    let c = cloud.client();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let nodes = c.list_nodes().await.unwrap();
    let probing = Path::new("/dev/kvm").exists();
    if probing {
        assert!(
            nodes[0].capabilities.vm_probe_pending && !nodes[0].capabilities.vms,
            "the node reports its probe: {:?}",
            nodes[0].capabilities
        );
    }
    let started = std::time::Instant::now();
    let launch = cloud
        .cli()
        .args([
            "launch", "busybox", "early", "--vm", "--cpus", "1", "--memory", "256M", "--",
        ])
        .args(["sleep", "100000"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    if probing {
        // Accepted and waiting, with the reason.
        let waiting = eventually(Duration::from_secs(5), || async {
            c.get_instance("early").await.ok()
        })
        .await
        .expect("the VM create is accepted while the probe runs");
        assert_eq!(waiting.status.state, InstanceState::Pending, "{waiting:?}");
        assert!(
            waiting
                .status
                .message
                .contains("probing its VM accelerator"),
            "{}",
            waiting.status.message
        );
    }
    let out = tokio::task::spawn_blocking(move || launch.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stdout = cli_ok(&out, "launch right after up");
    assert!(stdout.contains("early running on node1"), "{stdout}");
    eprintln!(
        "launch right after up: running after {:?}",
        started.elapsed()
    );
    let vm = c.get_instance("early").await.unwrap();
    assert_eq!(vm.status.state, InstanceState::Running);
    let node = c.list_nodes().await.unwrap().remove(0);
    assert!(node.capabilities.vms && !node.capabilities.vm_probe_pending);
    assert_eq!(
        vm.status.accelerator.as_deref(),
        node.capabilities.accelerator.as_deref()
    );
    cloud.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_is_starting_until_its_guest_agent_answers_so_exec_right_after_launch_works() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    let ready = eventually(Duration::from_secs(120), || async {
        c.list_nodes()
            .await
            .ok()?
            .into_iter()
            .find(|n| n.capabilities.vms)
    })
    .await;
    assert!(ready.is_some(), "the node must report VM support");
    // Watch the states the instance goes through while `launch` waits.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<InstanceState>::new()));
    let watcher = {
        let (c, seen) = (cloud.client(), seen.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(i) = c.get_instance("quick").await {
                    let mut seen = seen.lock().unwrap();
                    if seen.last() != Some(&i.status.state) {
                        seen.push(i.status.state);
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    let out = cloud
        .cli()
        .args([
            "launch", "busybox", "quick", "--vm", "--cpus", "1", "--memory", "256M", "--",
        ])
        .args(["sleep", "100000"])
        .output()
        .unwrap();
    cli_ok(&out, "launch");
    let t = std::time::Instant::now();
    let exec = cloud
        .cli()
        .args([
            "exec",
            "quick",
            "--",
            "sh",
            "-c",
            "echo answer-$((6*7)); exit 5",
        ])
        .output()
        .unwrap();
    let took = t.elapsed();
    watcher.abort();
    assert_eq!(
        exec.status.code(),
        Some(5),
        "exec right after launch: {}{}",
        String::from_utf8_lossy(&exec.stdout),
        String::from_utf8_lossy(&exec.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&exec.stdout).trim(), "answer-42");
    let seen = seen.lock().unwrap().clone();
    assert!(
        took < Duration::from_secs(5),
        "launch returned before the guest agent answered: exec took {took:?} (states seen {seen:?})"
    );
    let starting = seen.iter().position(|s| *s == InstanceState::Starting);
    let running = seen.iter().position(|s| *s == InstanceState::Running);
    assert!(
        matches!((starting, running), (Some(s), Some(r)) if s < r),
        "starting while QEMU boots, then running: {seen:?}"
    );
    assert_eq!(
        seen.iter()
            .filter(|s| **s == InstanceState::Running)
            .count(),
        1,
        "running once, never back to starting: {seen:?}"
    );
    cloud.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_without_a_command_stays_up_until_stopped() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    let out = cloud
        .cli()
        .args([
            "launch", "busybox", "idle", "--vm", "--cpus", "1", "--memory", "256M",
        ])
        .output()
        .unwrap();
    cli_ok(&out, "launch without a command");
    let vm = c.get_instance("idle").await.unwrap();
    assert_eq!(vm.status.state, InstanceState::Running);
    let pid = vm.status.pid.unwrap();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let vm = c.get_instance("idle").await.unwrap();
    assert_eq!(
        (vm.status.state, vm.status.pid),
        (InstanceState::Running, Some(pid)),
        "still up, same QEMU, after 60 s: {:?}\nconsole:\n{}",
        vm.status,
        c.logs("idle", None).await.unwrap_or_default()
    );
    assert!(pid_alive(pid));
    let r = c
        .exec("idle", vec!["echo".into(), "alive".into()])
        .await
        .unwrap();
    assert_eq!((r.exit_code, r.stdout.trim()), (0, "alive"));
    // The image's default command (busybox: `sh`) ran as a plain service.
    let log = c.logs("idle", None).await.unwrap();
    assert!(
        log.contains("the VM stays up until it is stopped"),
        "console:\n{log}"
    );
    cli_ok(
        &cloud.cli().args(["stop", "idle"]).output().unwrap(),
        "stop",
    );
    let stopped = eventually(Duration::from_secs(60), || async {
        c.get_instance("idle")
            .await
            .ok()
            .filter(|i| i.status.state == InstanceState::Stopped)
    })
    .await;
    assert!(stopped.is_some(), "stop powers it off");
    assert!(!pid_alive(pid));
    cloud.shutdown();
}

/// Mount points of this mount namespace.
fn mount_points() -> Vec<std::path::PathBuf> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(std::path::PathBuf::from)
        .collect()
}

/// Regular files under `dir` whose raw bytes contain `needle`, not descending into mount
/// points (the VM's secrets tmpfs is not a disk file).
fn files_containing(dir: &Path, needle: &[u8], mounts: &[std::path::PathBuf]) -> Vec<String> {
    walk(dir)
        .into_iter()
        .filter(|p| {
            !mounts
                .iter()
                .any(|m| p.starts_with(m) && m.starts_with(dir))
        })
        .filter(|p| p.is_file() && !p.is_symlink())
        .filter(|p| std::fs::read(p).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle)))
        .map(|p| p.display().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_gets_secrets_over_virtio_serial_and_never_on_disk() {
    if !deps() {
        return;
    }
    let cloud = Cloud::start(bin()).expect("nimbus up");
    let c = cloud.client();
    let node = eventually(Duration::from_secs(120), || async {
        c.list_nodes()
            .await
            .ok()?
            .into_iter()
            .find(|n| n.capabilities.vms)
    })
    .await;
    assert!(node.is_some(), "the node must report VM support");
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let file_value = format!("vm-file-secret-{tag}");
    let env_value = format!("vm-env-secret-{tag}");
    let scratch = tempfile::tempdir().unwrap();
    for (name, value) in [("db", &file_value), ("token", &env_value)] {
        let f = scratch.path().join(name);
        std::fs::write(&f, value).unwrap();
        let out = cloud
            .cli()
            .args(["secret", "create", name, "--from-file"])
            .arg(&f)
            .output()
            .unwrap();
        cli_ok(&out, "secret create");
    }
    drop(scratch);

    // The main service records the variable it got on the guest's /run (a tmpfs); the file's
    // mount point is on the guest's root disk.
    let out = cloud
        .cli()
        .args([
            "launch",
            "busybox",
            "sv",
            "--vm",
            "--cpus",
            "1",
            "--memory",
            "256M",
            "--secret",
            "db:/etc/app/db.conf",
            "--secret-env",
            "token:DB_TOKEN",
            "--",
            "sh",
            "-c",
            "echo \"main:$DB_TOKEN\" > /run/main-env; exec sleep 100000",
        ])
        .output()
        .unwrap();
    let mut outputs = vec![cli_ok(&out, "launch with secrets")];
    let exec = |cmd: &'static str| {
        let c = cloud.client();
        async move {
            c.exec("sv", vec!["sh".into(), "-c".into(), cmd.into()])
                .await
        }
    };
    let r = exec("cat /etc/app/db.conf").await.expect("exec cat");
    assert_eq!(
        (r.exit_code, r.stdout.as_str()),
        (0, file_value.as_str()),
        "{r:?}"
    );
    let main = eventually(Duration::from_secs(20), || async {
        exec("cat /run/main-env")
            .await
            .ok()
            .filter(|r| r.exit_code == 0)
    })
    .await
    .expect("the main service wrote /run/main-env");
    assert_eq!(main.stdout.trim_end(), format!("main:{env_value}"));
    // `exec` gets the secret variables too, like a container's exec.
    let r = exec("echo \"$DB_TOKEN\"").await.unwrap();
    assert_eq!(r.stdout.trim_end(), env_value);
    // 0400 root, a read-only tmpfs bind mount.
    let r = exec("stat -c '%a %u' /etc/app/db.conf; grep ' /etc/app/db.conf ' /proc/mounts")
        .await
        .unwrap();
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("400 0"), "{r:?}");
    let mnt = lines.next().unwrap_or_default();
    assert!(mnt.starts_with("tmpfs /etc/app/db.conf tmpfs ro,"), "{r:?}");
    let r = exec("echo x > /etc/app/db.conf").await.unwrap();
    assert_ne!(r.exit_code, 0, "the secret file must be read-only");
    // Flush the guest's page cache to its disk before the disk is searched.
    assert_eq!(exec("sync").await.unwrap().exit_code, 0);

    // On the node the values live only on the VM's secrets tmpfs.
    let vm = c.get_instance("sv").await.unwrap();
    let id = vm.meta.id.clone();
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        mountinfo
            .lines()
            .any(|l| l.contains(&format!("{id}/secrets ")) && l.contains(" - tmpfs ")),
        "no tmpfs for the secrets of {id}"
    );
    for args in [
        &["show", "sv", "-o", "json"][..],
        &["events", "--all", "-o", "json"],
        &["logs", "sv"],
    ] {
        let out = cloud.cli().args(args).output().unwrap();
        outputs.push(cli_ok(&out, "show/events/logs"));
    }
    for out in &outputs {
        assert!(
            !out.contains(&file_value) && !out.contains(&env_value),
            "a secret value leaked into an output: {out}"
        );
    }
    // Not in the raw bytes of any file of the server's and agent's data dirs (raft.redb, the
    // logs, spec.json, initrd.img, the qcow2 disk, the console log).
    let root = cloud.data_dir.parent().unwrap().to_path_buf();
    let mounts = mount_points();
    assert!(
        walk(&root)
            .iter()
            .any(|p| p.ends_with("disk.qcow2") && p.to_string_lossy().contains(&id)),
        "no VM disk to search under {}",
        root.display()
    );
    for needle in [&file_value, &env_value] {
        let found = files_containing(&root, needle.as_bytes(), &mounts);
        assert!(found.is_empty(), "{needle} found in {found:?}");
    }

    // Delete takes the tmpfs away.
    let out = cloud.cli().args(["delete", "sv"]).output().unwrap();
    cli_ok(&out, "delete");
    assert!(!std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .contains(&format!("{id}/secrets ")));
    cloud.shutdown();
}
