//! VM launch benchmark (ignored by default; run by `scripts/bench-vm`).
//!
//! Measures launch → guest agent ready through `VmDriver::start` + `wait_ready`, against bare
//! `qemu-system-x86_64` with the same kernel, initramfs, disk and devices, timed from spawn to the
//! guest agent's readiness line on the serial console, in the same invocation. Also reports the
//! QEMU process's RSS beyond what the guest touched. Writes a markdown section to
//! `NIMBUS_BENCH_OUT` (default `target/bench-vm.md`).

mod vm_support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nimbus_agent::driver::vm::Accel;
use nimbus_agent::driver::Driver;
use vm_support::{bridge_name, busybox_layer, driver, require_vm_support, spec};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Bare QEMU: same kernel, initramfs (with the same config), disk and devices; no QMP,
/// sandbox, cgroup, network or detaching. Ready = the guest agent's "ready" console line.
fn bare_boot(kernel: &std::path::Path, initrd: &std::path::Path, disk: &std::path::Path) -> f64 {
    let started = Instant::now();
    let mut child = Command::new("/usr/bin/qemu-system-x86_64")
        .args([
            "-M",
            "q35",
            "-accel",
            "tcg,thread=multi,tb-size=64",
            "-cpu",
            "max",
        ])
        .args(["-smp", "1", "-m", "256M", "-nodefaults", "-no-user-config"])
        .args(["-display", "none", "-no-reboot", "-serial", "stdio"])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 loglevel=4 mitigations=off",
        ])
        .arg("-drive")
        .arg(format!(
            "file={},if=none,id=d0,format=qcow2,discard=unmap",
            disk.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0"])
        .args(["-device", "virtio-serial-pci,id=vs0", "-nic", "none"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu");
    let out = BufReader::new(child.stdout.take().unwrap());
    let mut elapsed = None;
    for line in out.lines() {
        let Ok(line) = line else { break };
        if line.contains("nimbus-guest: ready") {
            elapsed = Some(started.elapsed().as_secs_f64());
            break;
        }
        if started.elapsed() > Duration::from_mins(2) {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    elapsed.expect("bare QEMU guest never printed its ready line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run with scripts/bench-vm"]
async fn bench_vm_launch() {
    if !require_vm_support() {
        return;
    }
    let runs: usize = std::env::var("NIMBUS_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let _serial = vm_support::SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let layer = busybox_layer(tmp.path());
    let state = tmp.path().join("state");
    let bridge = bridge_name();
    let _cleanup = vm_support::Cleanup::new(&state, &bridge);
    let drv = driver(&state, Accel::Tcg);
    let id = "vmbench";
    drv.create(&spec(id, &layer, &bridge, 30)).await.unwrap();

    // Baseline inputs: a copy of the same overlay (so both boot the same filesystem state), the
    // same kernel and the VM's own initramfs (written at its first start).
    let vm_dir = state.join("vms").join(id);
    let disk = tmp.path().join("bare.qcow2");
    let kernel = nimbus_agent::driver::vm::default_kernel_dir().join("vmlinuz");
    let initrd = vm_dir.join("initrd.img");

    // Interleaved, so load from elsewhere on the machine hits both columns alike.
    let mut nimbus = Vec::new();
    let mut bare = Vec::new();
    let mut rss = Vec::new();
    let mut touched = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let pid = drv.start(id).await.unwrap();
        drv.wait_ready(id, Duration::from_mins(2)).await.unwrap();
        nimbus.push(started.elapsed().as_secs_f64());
        let guest = drv.guest_stats(id, Duration::from_secs(10)).await.unwrap();
        rss.push(rss_kib(pid) as f64 / 1024.0);
        touched.push(guest.memory_bytes as f64 / f64::from(1u32 << 20));
        drv.stop(id, Duration::from_secs(20)).await.unwrap();
        if !disk.exists() {
            std::fs::copy(vm_dir.join("disk.qcow2"), &disk).unwrap();
        }
        let (k, i, dk) = (kernel.clone(), initrd.clone(), disk.clone());
        bare.push(
            tokio::task::spawn_blocking(move || bare_boot(&k, &i, &dk))
                .await
                .unwrap(),
        );
    }
    drv.delete(id).await.unwrap();

    let (nim, bare_s) = (median(&mut nimbus), median(&mut bare));
    let (rss_mib, used_mib) = (median(&mut rss), median(&mut touched));
    let accel = "tcg";
    let ram = 256.0;
    let report = format!(
        "## VM launch (scripts/bench-vm)\n\n\
         Launch to guest agent ready, median of {runs} runs each, same kernel, initramfs and disk, \
         accelerator {accel}, 1 vCPU, {ram:.0} MiB guest RAM.\n\n\
         | what | median |\n|---|---|\n\
         | nimbus `VmDriver::start` + guest agent ping answered | {nim:.2} s |\n\
         | bare `qemu-system-x86_64`, guest agent ready line on the serial console | {bare_s:.2} s |\n\
         | ratio nimbus / bare | {:.2} |\n\
         | QEMU RSS after boot | {rss_mib:.0} MiB |\n\
         | QEMU RSS beyond guest RAM (RSS - {ram:.0} MiB) | {:.0} MiB |\n\
         | guest memory in use (MemTotal - MemAvailable) | {used_mib:.0} MiB |\n\n\
         nimbus adds: the per-VM initramfs copy, cgroup setup, `setsid` wrapper, QMP handshake, \
         tap + bridge over netlink, the seccomp sandbox and the guest agent round trip over \
         virtio-serial. The boot itself dominates both columns under TCG; the numbers vary with \
         whatever else runs on the machine (the two columns ran interleaved in one invocation).\n",
        nim / bare_s,
        rss_mib - ram,
    );
    println!("{report}");
    let out = std::env::var("NIMBUS_BENCH_OUT").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/bench-vm.md").to_owned()
    });
    std::fs::write(&out, &report).unwrap();
}
