//! The VM driver against real QEMU guests (TCG here, KVM where it works).
//!
//! One scenario boots one VM and reuses it for most checks (each TCG boot costs seconds):
//! `Starting` until the guest agent answered then `Running`, user-data on the console, exec,
//! HTTP from the host, re-attach by a fresh driver, a file surviving stop/start, user-data
//! running once, delete leaving nothing. Smaller tests cover the accelerator probe and its
//! host-wide cache, stale probes of an earlier run, a main command's exit code, QEMU start
//! failures and a too-small disk.

mod vm_support;

use std::path::Path;
use std::time::Duration;

use nimbus_agent::driver::vm::Accel;
use nimbus_agent::driver::{Driver, DriverError, RuntimeState};
use vm_support::{
    bridge_name, busybox_layer, delete_bridge, driver, eventually, http_get, require_vm_support,
    spec,
};

const BOOT: Duration = Duration::from_mins(2);

fn console(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

async fn exec_ok(d: &dyn Driver, id: &str, argv: &[&str]) -> String {
    let argv: Vec<String> = argv.iter().map(|s| (*s).to_owned()).collect();
    let out = d
        .exec(id, &argv, BOOT)
        .await
        .unwrap_or_else(|e| panic!("exec {argv:?}: {e}"));
    assert_eq!(out.exit_code, 0, "exec {argv:?}: {out:?}");
    out.stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_lifecycle_network_user_data_reattach_and_delete() {
    if !require_vm_support() {
        return;
    }
    let _serial = vm_support::SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let layer = busybox_layer(tmp.path());
    let state = tmp.path().join("state");
    let bridge = bridge_name();
    let _cleanup = vm_support::Cleanup::new(&state, &bridge);
    let d = driver(&state, Accel::Tcg);
    let id = "vmtest-main";
    let mut s = spec(id, &layer, &bridge, 10);
    s.user_data = Some(
        "#!/bin/sh\necho USERDATA-MARKER-$(hostname)\nmkdir -p /www\necho hello-from-vm > /www/index.html\n".into(),
    );
    s.ssh_keys = vec!["ssh-ed25519 AAAAC3NzaTEST test@nimbus".into()];
    s.command = vec![
        "/bin/httpd".into(),
        "-f".into(),
        "-p".into(),
        "80".into(),
        "-h".into(),
        "/www".into(),
    ];
    s.disk_bytes = 512 << 20;

    d.create(&s).await.expect("create");
    d.create(&s).await.expect("create is idempotent");
    assert_eq!(d.state(id).await.unwrap(), RuntimeState::Created);
    assert_eq!(d.list().await.unwrap(), vec![id.to_owned()]);
    let pid = d.start(id).await.expect("start");
    // Booting: starting until the guest agent answered (TCG takes seconds), then running.
    assert_eq!(d.state(id).await.unwrap(), RuntimeState::Starting { pid });
    assert_eq!(
        d.start(id).await.unwrap(),
        pid,
        "start of a starting VM returns its pid"
    );
    let running = eventually(BOOT, || {
        (futures_lite_state(&d, id) == RuntimeState::Running { pid }).then_some(())
    })
    .await;
    assert!(
        running.is_some(),
        "never running: {:?}\n{}",
        d.state(id).await,
        console(&d.log_path(id))
    );
    // Running means the guest agent answers now, not after a wait.
    let t = std::time::Instant::now();
    let argv: Vec<String> = ["true"].map(str::to_owned).to_vec();
    assert_eq!(d.exec(id, &argv, BOOT).await.unwrap().exit_code, 0);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "exec on a running VM took {:?}",
        t.elapsed()
    );

    // Exec through the guest agent (waits for readiness).
    let uname = exec_ok(&d, id, &["uname", "-r"]).await;
    assert!(uname.contains("cloud-amd64"), "{uname}");
    let argv: Vec<String> = ["sh", "-c", "echo out; echo err >&2; exit 3"]
        .map(str::to_owned)
        .to_vec();
    let out = d.exec(id, &argv, BOOT).await.unwrap();
    assert_eq!(
        (out.exit_code, out.stdout.as_str(), out.stderr.as_str()),
        (3, "out\n", "err\n")
    );
    let argv: Vec<String> = ["sleep", "30"].map(str::to_owned).to_vec();
    assert!(matches!(
        d.exec(id, &argv, Duration::from_secs(1)).await,
        Err(DriverError::Timeout(_))
    ));
    assert_eq!(exec_ok(&d, id, &["hostname"]).await.trim(), id);
    assert!(exec_ok(&d, id, &["cat", "/root/.ssh/authorized_keys"])
        .await
        .contains("AAAAC3NzaTEST"));
    // The disk was grown to the requested size (512 MiB, base is smaller).
    let df = exec_ok(&d, id, &["df", "-m", "/"]).await;
    let size_mb: u64 = df
        .lines()
        .nth(1)
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(size_mb > 400, "root fs not grown: {df}");

    // User-data output reaches the console log.
    let log = d.log_path(id);
    let marker = format!("USERDATA-MARKER-{id}");
    assert!(
        eventually(BOOT, || console(&log).contains(&marker).then_some(()))
            .await
            .is_some(),
        "console log lacks the user-data marker:\n{}",
        console(&log)
    );

    // The guest is reachable from the host: busybox httpd (the main service) answers.
    let addr = format!("{}.10:80", vm_support::SUBNET_PREFIX);
    let body = eventually(Duration::from_mins(1), || {
        http_get(&addr).ok().filter(|b| b.contains("hello-from-vm"))
    })
    .await;
    if body.is_none() {
        let argv: Vec<String> = ["sh", "-c", "ip addr; ip route; ps"]
            .map(str::to_owned)
            .to_vec();
        let diag = d.exec(id, &argv, BOOT).await;
        panic!(
            "no HTTP answer from {addr}: {:?}\nguest: {diag:?}\nconsole:\n{}",
            http_get(&addr),
            console(&log)
        );
    }

    // Metrics.
    let st = d.stats(id).await.unwrap();
    assert!(st.cpu_nanos > 0 && st.memory_bytes > 0, "{st:?}");
    let gs = d.guest_stats(id, Duration::from_secs(10)).await.unwrap();
    assert!(gs.memory_total > 0 && gs.memory_bytes > 0, "{gs:?}");
    d.pause(id).await.unwrap();
    assert_eq!(d.run_state(id).await.unwrap(), "paused");
    d.resume(id).await.unwrap();
    assert_eq!(d.run_state(id).await.unwrap(), "running");

    // The interactive serial console: a shell answers on the console socket.
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut con = tokio::net::UnixStream::connect(d.console_socket(id))
            .await
            .unwrap();
        con.write_all(b"\necho CONSOLE-$((6*7))\n").await.unwrap();
        let mut seen = Vec::new();
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            let mut buf = [0u8; 1024];
            loop {
                let n = con.read(&mut buf).await.unwrap();
                assert!(n > 0, "console closed");
                seen.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&seen).contains("CONSOLE-42") {
                    break;
                }
            }
        })
        .await;
        assert!(
            found.is_ok(),
            "no shell answer on the console: {}\nlog:\n{}",
            String::from_utf8_lossy(&seen),
            console(&log)
        );
    }

    // The QEMU process runs in its cgroup.
    let procs = std::fs::read_to_string(format!(
        "/sys/fs/cgroup/memory/nimbus-test/{id}/cgroup.procs"
    ));
    if let Ok(procs) = procs {
        assert!(
            procs.lines().any(|l| l.trim() == pid.to_string()),
            "pid {pid} not in its cgroup: {procs}"
        );
    }

    // A file written now survives stop/start.
    exec_ok(
        &d,
        id,
        &["sh", "-c", "echo persist-me > /root/keep && sync"],
    )
    .await;

    // A fresh driver on the same state dir re-attaches to the running QEMU.
    drop(d);
    let d = driver(&state, Accel::Tcg);
    assert_eq!(d.state(id).await.unwrap(), RuntimeState::Running { pid });
    assert_eq!(
        exec_ok(&d, id, &["cat", "/root/keep"]).await.trim(),
        "persist-me"
    );

    // Graceful stop (guest agent -> power off), then start: the disk is kept.
    d.stop(id, Duration::from_mins(1)).await.expect("stop");
    assert!(
        matches!(
            d.state(id).await.unwrap(),
            RuntimeState::Exited { code: Some(0) }
        ),
        "{:?}",
        d.state(id).await
    );
    d.stop(id, Duration::from_secs(5))
        .await
        .expect("stopping a stopped VM is a no-op");
    let pid2 = d.start(id).await.expect("restart");
    assert_ne!(pid, pid2);
    assert_eq!(
        d.state(id).await.unwrap(),
        RuntimeState::Starting { pid: pid2 },
        "a restarted VM boots again: readiness is per QEMU"
    );
    assert_eq!(
        exec_ok(&d, id, &["cat", "/root/keep"]).await.trim(),
        "persist-me"
    );
    let ran = console(&log).matches("running user-data").count();
    assert_eq!(
        ran,
        1,
        "user-data must run once per disk:\n{}",
        console(&log)
    );

    // Delete leaves no trace: process, tap, cgroup, files.
    let tap = nimbus_net::host_ifname("nt", id);
    assert!(
        Path::new("/sys/class/net").join(&tap).exists(),
        "tap {tap} missing"
    );
    d.delete(id).await.expect("delete");
    assert_eq!(d.state(id).await.unwrap(), RuntimeState::Absent);
    assert!(
        !Path::new(&format!("/proc/{pid2}")).exists()
            || !std::fs::read_to_string(format!("/proc/{pid2}/cmdline"))
                .unwrap_or_default()
                .contains("qemu")
    );
    assert!(
        !Path::new("/sys/class/net").join(&tap).exists(),
        "tap {tap} left behind"
    );
    assert!(!state.join("vms").join(id).exists());
    assert!(!Path::new("/sys/fs/cgroup/memory/nimbus-test")
        .join(id)
        .exists());
    assert!(d.list().await.unwrap().is_empty());
    d.delete(id)
        .await
        .expect("deleting an absent VM is a no-op");
    delete_bridge(&bridge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn main_command_exit_code_and_start_failures() {
    if !require_vm_support() {
        return;
    }
    let _serial = vm_support::SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let layer = busybox_layer(tmp.path());
    // A long state dir: sockets must fall back to short paths under /run/nimbus.
    let state = tmp
        .path()
        .join("a-rather-long-state-directory-name-to-exceed-unix-socket-path-limits");
    let bridge = bridge_name();
    let _cleanup = vm_support::Cleanup::new(&state, &bridge);
    let d = driver(&state, Accel::Tcg);

    // The main command's exit code becomes the instance's, and the VM powers off.
    let mut s = spec("vmtest-exit", &layer, &bridge, 11);
    s.command = vec!["sh".into(), "-c".into(), "echo main-ran; exit 7".into()];
    d.create(&s).await.unwrap();
    d.start("vmtest-exit").await.unwrap();
    let exited = eventually(BOOT, || {
        let st = futures_lite_state(&d, "vmtest-exit");
        matches!(st, RuntimeState::Exited { .. }).then_some(st)
    })
    .await;
    assert_eq!(
        exited,
        Some(RuntimeState::Exited { code: Some(7) }),
        "{}",
        console(&d.log_path("vmtest-exit"))
    );
    assert!(console(&d.log_path("vmtest-exit")).contains("main-ran"));
    d.delete("vmtest-exit").await.unwrap();

    // A disk smaller than the image fails clearly.
    let mut s = spec("vmtest-small", &layer, &bridge, 12);
    s.disk_bytes = 1 << 20;
    let err = d.create(&s).await.unwrap_err();
    assert!(err.to_string().contains("smaller than the image"), "{err}");
    assert_eq!(d.state("vmtest-small").await.unwrap(), RuntimeState::Absent);

    // QEMU refusing to start surfaces its own words.
    let mut s = spec("vmtest-bad", &layer, &bridge, 13);
    s.network.mac = "not-a-mac".into();
    d.create(&s).await.unwrap();
    match d.start("vmtest-bad").await {
        Err(DriverError::Runtime {
            tool: "qemu",
            message,
        }) => assert!(message.contains("not-a-mac"), "{message}"),
        other => panic!("expected a qemu error, got {other:?}"),
    }
    d.delete("vmtest-bad").await.unwrap();
    delete_bridge(&bridge);
}

/// `state` from sync code (the polling helper takes a closure).
fn futures_lite_state(d: &nimbus_agent::driver::vm::VmDriver, id: &str) -> RuntimeState {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(d.state(id))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_accel_picks_a_working_accelerator() {
    if !require_vm_support() {
        return;
    }
    let _serial = vm_support::SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let d = driver(tmp.path(), Accel::Auto);
    assert_eq!(d.capability(), Ok(()));
    let started = std::time::Instant::now();
    let accel = d.accelerator().await.unwrap();
    let reason = d.accelerator_reason().await.unwrap();
    eprintln!(
        "accelerator {accel} after {:?}: {reason}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the KVM probe must have a deadline"
    );
    // This machine's nested KVM cannot boot a real guest: the probe must pick TCG. Elsewhere
    // (NIMBUS_EXPECT_ACCEL=kvm on real hardware) KVM.
    let expected = std::env::var("NIMBUS_EXPECT_ACCEL").unwrap_or_else(|_| "tcg".into());
    assert_eq!(accel, expected, "{reason}");
    // Cached: a fresh driver answers at once.
    let d2 = driver(tmp.path(), Accel::Auto);
    let t = std::time::Instant::now();
    assert_eq!(d2.accelerator().await.unwrap(), accel);
    assert!(t.elapsed() < Duration::from_secs(2));
    // Host-wide: a driver on another state directory (another data dir) sharing the cache
    // knows the verdict before probing, and no probe runs for it.
    let other = tempfile::tempdir().unwrap();
    let d3 = vm_support::driver_with_cache(other.path(), Accel::Auto, &tmp.path().join("cache"));
    let known = d3.known_accelerator().expect("cached host-wide");
    assert_eq!(known.accel.as_str(), accel);
    let t = std::time::Instant::now();
    assert_eq!(d3.accelerator().await.unwrap(), accel);
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(
        !other
            .path()
            .join("initramfs")
            .read_dir()
            .unwrap()
            .any(|_| true),
        "no probe initramfs was built for the cached verdict"
    );
}

/// PIDs whose command line contains `needle`.
fn pids_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(needle)
                .then_some(pid)
        })
        .collect()
}

/// Starts a stand-in for a probe QEMU an earlier process left behind (re-parented: not our
/// child), whose initramfs lies in `initramfs_dir`; returns its PID.
async fn fake_stale_probe(initramfs_dir: &Path) -> u32 {
    let initrd = initramfs_dir.join("initramfs-test.cpio");
    let status = std::process::Command::new("setsid")
        .args([
            "-f",
            "sh",
            "-c",
            "while sleep 0.2; do :; done",
            "qemu-system-x86_64",
        ])
        .args(["-kernel", "/nonexistent/vmlinuz", "-initrd"])
        .arg(&initrd)
        .args(["-append", "console=ttyS0 panic=-1 nimbus.probe=1"])
        .status()
        .unwrap();
    assert!(status.success());
    let needle = initrd.to_string_lossy().into_owned();
    let pids = eventually(Duration::from_secs(5), || {
        Some(pids_with(&needle)).filter(|p| p.len() == 1)
    })
    .await
    .expect("the stand-in probe runs");
    pids[0]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_probes_of_this_state_dir_are_killed_at_start_and_no_others() {
    let tmp = tempfile::tempdir().unwrap();
    let (mine, other) = (tmp.path().join("mine"), tmp.path().join("mine-other"));
    let stale = fake_stale_probe(&mine.join("initramfs")).await;
    let foreign = fake_stale_probe(&other.join("initramfs")).await;
    let _d = driver(&mine, Accel::Tcg);
    let killed = eventually(Duration::from_secs(2), || {
        (!nimbus_testkit::pid_alive(stale)).then_some(())
    })
    .await;
    let foreign_alive = nimbus_testkit::pid_alive(foreign);
    for pid in [stale, foreign] {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    assert!(
        killed.is_some(),
        "the stale probe of this state dir must be killed"
    );
    assert!(
        foreign_alive,
        "another state dir's probe must be left alone"
    );
}

/// The shared driver conformance suite, with VM-sized timeouts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    use nimbus_agent::driver::conformance::{run_all, SuiteOptions};
    use std::sync::atomic::{AtomicU8, Ordering};
    if !require_vm_support() {
        return;
    }
    let _serial = vm_support::SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let layer = busybox_layer(tmp.path());
    let state = tmp.path().join("state");
    let bridge = bridge_name();
    let _cleanup = vm_support::Cleanup::new(&state, &bridge);
    let d = driver(&state, Accel::Tcg);
    let next = AtomicU8::new(20);
    let make = |id: &str, command: Vec<String>| {
        let mut s = spec(id, &layer, &bridge, next.fetch_add(1, Ordering::Relaxed));
        s.command = command;
        s
    };
    let o = SuiteOptions {
        timeout: BOOT,
        grace: Duration::from_secs(30),
    };
    run_all(&d, &make, &o).await;
}
