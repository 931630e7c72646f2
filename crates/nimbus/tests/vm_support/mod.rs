//! Shared helpers of the VM driver tests: prerequisites, a busybox image layer, specs,
//! a private test bridge.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use nimbus_agent::driver::vm::{default_kernel_dir, Accel, VmConfig, VmDriver};
use nimbus_agent::driver::RuntimeSpec;
use nimbus_api::agent::{ImageRef, NetworkAttachment};

/// VM tests run one at a time (each boot wants both cores under TCG).
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The test subnet: outside the product pool 10.213.0.0/16 (and the container tests 10.215.x).
pub const SUBNET_PREFIX: &str = "10.216.251";

/// Whether VMs can run here; with `CI=true` a missing prerequisite fails the test instead.
pub fn require_vm_support() -> bool {
    let kernel = default_kernel_dir();
    let qemu = Path::new("/usr/bin/qemu-system-x86_64");
    let mut missing = Vec::new();
    if !qemu.exists() {
        missing.push("qemu-system-x86_64".to_owned());
    }
    if !kernel.join("vmlinuz").exists() {
        missing.push(format!("guest kernel in {}", kernel.display()));
    }
    if missing.is_empty() {
        return true;
    }
    let msg = format!(
        "VM tests need {} (run scripts/setup-vm)",
        missing.join(", ")
    );
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
    eprintln!("SKIPPED (not CI): {msg}");
    false
}

/// The static guest agent: `NIMBUS_GUEST_AGENT`, else built here with cargo.
pub fn guest_agent() -> PathBuf {
    if let Some(p) = std::env::var_os("NIMBUS_GUEST_AGENT") {
        return PathBuf::from(p);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target =
        std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "-p",
            "nimbus-guest-agent",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
        ])
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env("CARGO_TARGET_DIR", &target)
        .current_dir(&root)
        .status()
        .expect("running cargo to build the guest agent");
    assert!(status.success(), "building the static guest agent failed");
    target.join("x86_64-unknown-linux-gnu/release/nimbus-guest-agent")
}

/// A driver on `state_dir` with TCG (or `accel`); accelerator verdicts are cached in
/// `state_dir/cache` (a fresh state dir probes anew).
pub fn driver(state_dir: &Path, accel: Accel) -> VmDriver {
    driver_with_cache(state_dir, accel, &state_dir.join("cache"))
}

/// A driver on `state_dir` caching accelerator verdicts in `cache_dir`.
pub fn driver_with_cache(state_dir: &Path, accel: Accel, cache_dir: &Path) -> VmDriver {
    VmDriver::new(VmConfig {
        state_dir: state_dir.to_path_buf(),
        qemu: PathBuf::from("/usr/bin/qemu-system-x86_64"),
        kernel_dir: default_kernel_dir(),
        accel,
        guest_agent: guest_agent(),
        cgroup_parent: "nimbus-test".into(),
        cache_dir: cache_dir.to_path_buf(),
    })
    .expect("VmDriver::new")
}

/// A one-layer busybox image (static busybox + applet symlinks) under `dir`.
pub fn busybox_layer(dir: &Path) -> PathBuf {
    let layer = dir.join("layer0");
    let bin = layer.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::copy("/bin/busybox", bin.join("busybox")).unwrap();
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = std::os::unix::fs::symlink("busybox", bin.join(applet));
        }
    }
    std::fs::create_dir_all(layer.join("etc")).unwrap();
    std::fs::write(layer.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    layer
}

/// A unique bridge name.
pub fn bridge_name() -> String {
    format!(
        "nbv{:05x}",
        (std::process::id() ^ Instant::now().elapsed().subsec_nanos()) & 0xfffff
    )
}

/// A VM spec on `bridge` with host part `host` of the test subnet.
pub fn spec(id: &str, layer: &Path, bridge: &str, host: u8) -> RuntimeSpec {
    RuntimeSpec {
        id: id.into(),
        name: id.into(),
        image: ImageRef {
            name: "busybox".into(),
            digest: "sha256:testbusybox".into(),
            layers: vec!["sha256:layer0".into()],
            default_command: vec![],
            default_env: vec![],
            working_dir: "/".into(),
        },
        layer_dirs: vec![layer.to_path_buf()],
        command: vec![],
        env: vec!["PATH=/bin:/sbin:/usr/bin:/usr/sbin".into()],
        working_dir: "/".into(),
        cpus: 1.0,
        memory_bytes: 256 << 20,
        disk_bytes: 256 << 20,
        pids_limit: 512,
        network: NetworkAttachment {
            bridge: bridge.into(),
            ip: format!("{SUBNET_PREFIX}.{host}"),
            prefix_len: 24,
            gateway: format!("{SUBNET_PREFIX}.1"),
            mac: format!("52:54:00:d5:fb:{host:02x}"),
            mtu: 0,
        },
        user_data: None,
        ssh_keys: vec![],
        secrets: nimbus_agent::driver::SecretMaterial::default(),
    }
}

/// Removes the test bridge.
pub fn delete_bridge(bridge: &str) {
    let _ = Command::new("ip")
        .args(["link", "del", bridge])
        .stderr(std::process::Stdio::null())
        .status();
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub async fn eventually<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One HTTP/1.0 GET from the host.
pub fn http_get(addr: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s =
        std::net::TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: vm\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Kills the QEMUs of a test state dir, removes their cgroups and the test bridge when the
/// test ends, even by a panic.
pub struct Cleanup {
    /// The driver's state dir.
    pub state: PathBuf,
    /// The test bridge.
    pub bridge: String,
}

impl Cleanup {
    /// Also removes stale test bridges (`nbv*` on the test subnet) left by killed runs.
    pub fn new(state: &Path, bridge: &str) -> Self {
        let out = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        for line in String::from_utf8_lossy(&out).lines() {
            let mut w = line.split_whitespace();
            let name = w.nth(1).unwrap_or("");
            if name.starts_with("nbv") && line.contains(&format!("{SUBNET_PREFIX}.1/")) {
                delete_bridge(name);
            }
        }
        Self {
            state: state.to_path_buf(),
            bridge: bridge.to_owned(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let vms = self.state.join("vms");
        for entry in std::fs::read_dir(&vms).into_iter().flatten().flatten() {
            let dir = entry.path();
            let pid = std::fs::read_to_string(dir.join("qemu.pid")).unwrap_or_default();
            let pid = pid.trim();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if !pid.is_empty()
                && String::from_utf8_lossy(&cmdline).contains(dir.to_string_lossy().as_ref())
            {
                let _ = Command::new("kill").args(["-9", pid]).status();
                std::thread::sleep(Duration::from_millis(200));
            }
            let id = entry.file_name();
            for c in ["cpu", "memory", "pids"] {
                let _ = std::fs::remove_dir(
                    Path::new("/sys/fs/cgroup")
                        .join(c)
                        .join("nimbus-test")
                        .join(&id),
                );
            }
        }
        delete_bridge(&self.bridge);
    }
}
