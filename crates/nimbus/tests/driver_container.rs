//! The container driver against real runc: the driver conformance suite plus container-specific
//! checks (cgroup limits, networking, re-attach, cleanup).
//!
//! Needs root, runc and busybox. Without them the tests skip with a message, except under
//! `CI=true`, where they fail.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nimbus_agent::driver::conformance::{self, SuiteOptions};
use nimbus_agent::driver::container::{find_in_path, ContainerConfig, ContainerDriver};
use nimbus_agent::driver::{Driver, DriverError, RuntimeSpec, RuntimeState};
use nimbus_api::agent::{ImageRef, NetworkAttachment};

const CGROUP_PARENT: &str = "nimbus";

/// runc and busybox, or `None` (skip) outside CI; panics under `CI=true`.
fn tools() -> Option<(PathBuf, PathBuf)> {
    let runc = find_in_path("runc");
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
    let root = nix::unistd::geteuid().is_root();
    match (runc, busybox, root) {
        (Some(r), Some(b), true) => Some((r, b)),
        (r, b, root) => {
            let msg = format!("container driver tests need root, runc and busybox (root: {root}, runc: {r:?}, busybox: {b:?})");
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}");
            eprintln!("SKIPPED: {msg}");
            None
        }
    }
}

/// A busybox root filesystem layer: busybox + applet symlinks, /etc/passwd, /tmp, ...
fn busybox_layer(dir: &Path, busybox: &Path) {
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "etc", "tmp", "root", "proc", "sys", "dev", "var/www",
    ] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy(busybox, dir.join("bin/busybox")).unwrap();
    let out = std::process::Command::new(busybox)
        .arg("--list-full")
        .output()
        .unwrap();
    for applet in String::from_utf8_lossy(&out.stdout).lines() {
        let path = dir.join(applet);
        if applet == "bin/busybox" || path.exists() {
            continue;
        }
        std::os::unix::fs::symlink("/bin/busybox", path).unwrap();
    }
    std::fs::write(
        dir.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )
    .unwrap();
    std::fs::write(dir.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    std::fs::set_permissions(dir.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
}

/// A per-test subnet 10.215.N.0/24: outside the product pool (10.213.0.0/16), the VM tests'
/// and the nimbus-net tests' (10.214.N.0/24), distinct across the tests of this process.
fn next_subnet() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let base = std::process::id() % 50 * 4;
    10 + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % 240
}

/// A test environment: state dir, busybox layer, a bridge of its own.
struct Env {
    /// `None` in a helper child process (which must not clean up).
    tmp: Option<tempfile::TempDir>,
    state_dir: PathBuf,
    layer: PathBuf,
    bridge: String,
    subnet: u32,
    next_ip: AtomicU32,
    cfg: ContainerConfig,
}

impl Env {
    fn new() -> Option<Self> {
        let (runc, busybox) = tools()?;
        let tmp = tempfile::tempdir().unwrap();
        let layer = tmp.path().join("layer");
        busybox_layer(&layer, &busybox);
        let state_dir = tmp.path().join("state");
        let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
        let cfg = ContainerConfig {
            state_dir: state_dir.clone(),
            runc,
            shim: vec![env!("CARGO_BIN_EXE_nimbus").into(), "shim".into()],
            cgroup_parent: CGROUP_PARENT.into(),
            runc_root: nimbus_agent::driver::container::DEFAULT_RUNC_ROOT.into(),
            net_scope: None,
        };
        Some(Self {
            tmp: Some(tmp),
            state_dir,
            layer,
            bridge: format!("nbt{suffix}"),
            subnet: next_subnet(),
            next_ip: AtomicU32::new(10),
            cfg,
        })
    }

    /// The environment of the parent test, in the helper child (see `HELPER_ENV`).
    fn from_helper_env(v: &str) -> Self {
        let parts: Vec<&str> = v.split('|').collect();
        let state_dir = PathBuf::from(parts[0]);
        Self {
            tmp: None,
            cfg: ContainerConfig {
                state_dir: state_dir.clone(),
                runc: find_in_path("runc").unwrap(),
                shim: vec![env!("CARGO_BIN_EXE_nimbus").into(), "shim".into()],
                cgroup_parent: CGROUP_PARENT.into(),
                runc_root: nimbus_agent::driver::container::DEFAULT_RUNC_ROOT.into(),
                net_scope: None,
            },
            state_dir,
            layer: PathBuf::from(parts[1]),
            bridge: parts[2].into(),
            subnet: parts[3].parse().unwrap(),
            next_ip: AtomicU32::new(100),
        }
    }

    fn helper_env(&self) -> String {
        format!(
            "{}|{}|{}|{}",
            self.state_dir.display(),
            self.layer.display(),
            self.bridge,
            self.subnet
        )
    }

    fn driver(&self) -> ContainerDriver {
        ContainerDriver::new(self.cfg.clone()).unwrap()
    }

    fn spec(&self, id: &str, command: Vec<String>) -> RuntimeSpec {
        let host = self.next_ip.fetch_add(1, Ordering::Relaxed);
        let subnet = self.subnet;
        RuntimeSpec {
            id: id.into(),
            name: format!("c-{}", &id[..8.min(id.len())]),
            image: ImageRef {
                name: "busybox".into(),
                digest: String::new(),
                layers: vec![],
                default_command: vec![],
                default_env: vec![],
                working_dir: String::new(),
            },
            layer_dirs: vec![self.layer.clone()],
            command,
            env: vec!["HOME=/root".into()],
            working_dir: "/".into(),
            cpus: 1.0,
            memory_bytes: 128 << 20,
            disk_bytes: 0,
            pids_limit: 256,
            network: NetworkAttachment {
                bridge: self.bridge.clone(),
                ip: format!("10.215.{subnet}.{host}"),
                prefix_len: 24,
                gateway: format!("10.215.{subnet}.1"),
                mac: format!("02:00:0a:d7:{subnet:02x}:{host:02x}"),
                mtu: 0,
            },
            user_data: None,
            ssh_keys: vec![],
            secrets: nimbus_agent::driver::SecretMaterial::default(),
        }
    }

    /// Deletes every container and the bridge.
    async fn cleanup(&self) {
        let d = self.driver();
        for id in d.list().await.unwrap_or_default() {
            if let Err(e) = d.delete(&id).await {
                eprintln!("cleanup of {id} failed: {e}");
            }
        }
        if let Ok(nl) = nimbus_net::Netlink::connect().await {
            let _ = nl.delete_link(&self.bridge).await;
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        if self.tmp.is_none() {
            return;
        }
        // Best effort when a test panicked before its own cleanup (own runtime, own thread).
        let cfg = self.cfg.clone();
        let bridge = self.bridge.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let d = ContainerDriver::new(cfg).unwrap();
                for id in d.list().await.unwrap_or_default() {
                    let _ = d.delete(&id).await;
                }
                if let Ok(nl) = nimbus_net::Netlink::connect().await {
                    let _ = nl.delete_link(&bridge).await;
                }
            });
        })
        .join();
    }
}

fn sh(script: &str) -> Vec<String> {
    vec!["sh".into(), "-c".into(), script.into()]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite() {
    let Some(env) = Env::new() else { return };
    let d = env.driver();
    let make = |id: &str, cmd: Vec<String>| env.spec(id, cmd);
    conformance::run_all(&d, &make, &SuiteOptions::default()).await;
    env.cleanup().await;
}

fn read_trim(p: &Path) -> String {
    std::fs::read_to_string(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_are_in_the_cgroup() {
    let Some(env) = Env::new() else { return };
    let d = env.driver();
    let id = conformance::new_id();
    let mut spec = env.spec(&id, conformance::long_running("limits"));
    spec.cpus = 0.5;
    spec.memory_bytes = 64 << 20;
    spec.pids_limit = 50;
    d.create(&spec).await.unwrap();
    d.start(&id).await.unwrap();
    let cg = |ctrl: &str, file: &str| {
        read_trim(
            &Path::new("/sys/fs/cgroup")
                .join(ctrl)
                .join(CGROUP_PARENT)
                .join(&id)
                .join(file),
        )
    };
    assert_eq!(
        cg("memory", "memory.limit_in_bytes"),
        (64u64 << 20).to_string()
    );
    assert_eq!(cg("cpu", "cpu.cfs_quota_us"), "50000");
    assert_eq!(cg("cpu", "cpu.cfs_period_us"), "100000");
    assert_eq!(cg("pids", "pids.max"), "50");
    // Busy a little so CPU accounting moves.
    let r = d
        .exec(
            &id,
            &sh("i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; echo done"),
            Duration::from_mins(1),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, "done\n");
    let stats = d.stats(&id).await.unwrap();
    assert!(stats.cpu_nanos > 0, "{stats:?}");
    assert!(stats.memory_bytes > 0, "{stats:?}");
    // The pids limit bites.
    let r = d
        .exec(
            &id,
            &sh("for i in $(seq 1 80); do sleep 5 & done 2>/dev/null; wait; echo end"),
            Duration::from_mins(1),
        )
        .await
        .unwrap();
    assert_ne!(r.exit_code, 0, "fork beyond pids.max should fail: {r:?}");
    d.delete(&id).await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httpd_answers_on_the_container_ip() {
    let Some(env) = Env::new() else { return };
    let d = env.driver();
    let id = conformance::new_id();
    let spec = env.spec(
        &id,
        sh("mkdir -p /www && echo hello-nimbus > /www/index.html && exec httpd -f -p 8080 -h /www"),
    );
    let ip = spec.network.ip.clone();
    d.create(&spec).await.unwrap();
    d.start(&id).await.unwrap();
    // Hostname and /etc files.
    let r = d
        .exec(
            &id,
            &sh(
                "hostname; grep -c \"$(hostname)\" /etc/hosts; ip -4 addr show eth0 | grep -c inet",
            ),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert_eq!(r.stdout, format!("{}\n1\n1\n", spec.name), "{r:?}");
    let addr: SocketAddr = format!("{ip}:8080").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let body = loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(b) if b.contains("hello-nimbus") => break b,
            other if Instant::now() >= deadline => panic!("no answer from {addr}: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert!(body.starts_with("HTTP/1."), "{body}");
    d.delete(&id).await.unwrap();
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reattach_and_exit_code_recorded_without_a_driver() {
    let Some(env) = Env::new() else { return };
    let running = conformance::new_id();
    let exiting = conformance::new_id();
    let (pid, _) = {
        let d = env.driver();
        d.create(&env.spec(&running, conformance::long_running("reattach")))
            .await
            .unwrap();
        d.create(&env.spec(&exiting, sh("sleep 2; exit 42")))
            .await
            .unwrap();
        let pid = d.start(&running).await.unwrap();
        let pid2 = d.start(&exiting).await.unwrap();
        (pid, pid2)
        // The driver is dropped here; the shims keep running.
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    let d = env.driver();
    assert_eq!(
        d.state(&running).await.unwrap(),
        RuntimeState::Running { pid }
    );
    assert_eq!(
        d.state(&exiting).await.unwrap(),
        RuntimeState::Exited { code: Some(42) }
    );
    let r = d
        .exec(&running, &sh("echo again"), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(r.stdout, "again\n");
    // A stop through the new driver records the status too (SIGTERM trapped → 0).
    d.stop(&running, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        d.state(&running).await.unwrap(),
        RuntimeState::Exited { code: Some(0) }
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_is_128_plus_signal_and_runc_errors_surface() {
    let Some(env) = Env::new() else { return };
    let d = env.driver();
    // A main process that ignores SIGTERM: stop escalates to SIGKILL after the grace.
    let id = conformance::new_id();
    d.create(&env.spec(&id, sh("trap '' TERM; while true; do sleep 1; done")))
        .await
        .unwrap();
    d.start(&id).await.unwrap();
    let t = Instant::now();
    d.stop(&id, Duration::from_secs(1)).await.unwrap();
    assert!(t.elapsed() >= Duration::from_secs(1));
    assert_eq!(
        d.state(&id).await.unwrap(),
        RuntimeState::Exited { code: Some(137) }
    );
    d.delete(&id).await.unwrap();

    // runc's own words come back when it cannot start the process (`runc create` checks the
    // binary, so `create` already fails, and leaves nothing behind).
    let bad = conformance::new_id();
    let failed = match d
        .create(&env.spec(&bad, vec!["/no/such/binary".into()]))
        .await
    {
        Err(e) => Err(e),
        Ok(()) => d.start(&bad).await,
    };
    match failed {
        Err(DriverError::Runtime {
            tool: "runc",
            message,
        }) => {
            assert!(
                message.contains("no such file") || message.contains("/no/such/binary"),
                "{message}"
            );
        }
        other => panic!("expected a runc error, got {other:?}"),
    }
    d.delete(&bad).await.unwrap();
    env.cleanup().await;
}

fn mounts_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| l.contains(needle))
        .map(String::from)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_leaves_nothing_behind() {
    let Some(env) = Env::new() else { return };
    let d = env.driver();
    let id = conformance::new_id();
    d.create(&env.spec(&id, conformance::long_running("cleanup")))
        .await
        .unwrap();
    let pid = d.start(&id).await.unwrap();
    let bundle = env.state_dir.join(&id);
    let shim_pid: i32 = read_trim(&bundle.join("shim.pid")).parse().unwrap();
    let netns = nimbus_net::netns_path(&id);
    let veth = nimbus_net::host_ifname("nv", &id);
    let nl = nimbus_net::Netlink::connect().await.unwrap();
    assert!(netns.exists());
    assert!(nl.link_index(&veth).await.unwrap().is_some());
    assert!(!mounts_mentioning(&id).is_empty());

    d.delete(&id).await.unwrap();

    assert_eq!(d.state(&id).await.unwrap(), RuntimeState::Absent);
    assert!(!bundle.exists(), "bundle dir left");
    assert!(
        mounts_mentioning(&id).is_empty(),
        "mounts left: {:?}",
        mounts_mentioning(&id)
    );
    assert!(mounts_mentioning(&netns.display().to_string()).is_empty());
    assert!(!netns.exists(), "netns left");
    assert!(nl.link_index(&veth).await.unwrap().is_none(), "veth left");
    for ctrl in std::fs::read_dir("/sys/fs/cgroup").unwrap() {
        let p = ctrl.unwrap().path().join(CGROUP_PARENT).join(&id);
        assert!(!p.exists(), "cgroup left: {}", p.display());
    }
    for p in [pid as i32, shim_pid] {
        let alive = std::fs::read_to_string(format!("/proc/{p}/cmdline"))
            .is_ok_and(|c| !c.is_empty() && (c.contains(&id) || c.contains("sh")));
        assert!(!alive, "process {p} left");
    }
    assert!(
        !Path::new(nimbus_agent::driver::container::DEFAULT_RUNC_ROOT)
            .join(&id)
            .exists()
    );
    env.cleanup().await;
}

/// Set in the helper child of `agent_sigkill_keeps_containers`: the parent's `Env`.
const HELPER_ENV: &str = "NIMBUS_CONTAINER_TEST_HELPER";

/// Not a test of its own: when `HELPER_ENV` is set, acts as an agent that starts a container,
/// prints `STARTED <id> <pid>` and waits to be SIGKILLed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helper_agent_process() {
    let Ok(v) = std::env::var(HELPER_ENV) else {
        return;
    };
    let env = Env::from_helper_env(&v);
    let d = env.driver();
    let id = conformance::new_id();
    d.create(&env.spec(&id, conformance::long_running("orphan")))
        .await
        .unwrap();
    let pid = d.start(&id).await.unwrap();
    println!("STARTED {id} {pid}");
    std::io::stdout().flush().unwrap();
    tokio::time::sleep(Duration::from_secs(600)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sigkill_keeps_containers() {
    let Some(env) = Env::new() else { return };
    if std::env::var(HELPER_ENV).is_ok() {
        return;
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "helper_agent_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ENV, env.helper_env())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.split_once("STARTED ").map(|(_, rest)| rest.to_string()))
    });
    let line = tokio::time::timeout(Duration::from_mins(1), line).await;
    // SIGKILL the "agent" (also when it failed, so nothing hangs).
    child.kill().unwrap();
    child.wait().unwrap();
    let line = line
        .expect("helper did not start a container in time")
        .unwrap()
        .expect("helper exited without starting a container");
    // libtest prints "test helper_agent_process ... " before it on the same line.
    let mut parts = line.split_whitespace();
    let id = parts.next().unwrap().to_string();
    let pid: u32 = parts.next().unwrap().parse().unwrap();

    tokio::time::sleep(Duration::from_millis(500)).await;
    let d = env.driver();
    assert_eq!(d.state(&id).await.unwrap(), RuntimeState::Running { pid });
    assert!(conformance::wait_log(&d, &id, "orphan", Duration::from_secs(10)).await);
    let r = d
        .exec(&id, &sh("echo alive"), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(r.stdout, "alive\n");
    d.stop(&id, Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        d.state(&id).await.unwrap(),
        RuntimeState::Exited { code: Some(0) }
    );
    env.cleanup().await;
}

/// The host's neighbour entry for `ip` on `bridge`: its MAC and state.
fn host_neighbour(bridge: &str, ip: &str) -> String {
    let out = std::process::Command::new("ip")
        .args(["neigh", "show", "to", ip, "dev", bridge])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// GET `/` of `addr` once, with short timeouts.
fn http_once(addr: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// An address freed by a deleted container and given to a new one reaches the new one at once:
/// the host (where load balancers and health checks run) talked to the old holder a moment
/// ago, so its neighbour entry is `REACHABLE` with the old MAC for up to 45 s; the create must
/// point it at the new MAC (not only hope a gratuitous ARP gets through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reused_address_reaches_its_new_holder_at_once() {
    let Some(env) = Env::new() else { return };
    let d = env.driver();
    let serve = |page: &str| {
        sh(&format!(
            "mkdir -p /www && echo {page} > /www/index.html && exec httpd -f -p 8080 -h /www"
        ))
    };
    let old = conformance::new_id();
    let old_spec = env.spec(&old, serve("old-holder"));
    let ip = old_spec.network.ip.clone();
    let addr: SocketAddr = format!("{ip}:8080").parse().unwrap();
    d.create(&old_spec).await.unwrap();
    d.start(&old).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !http_once(addr).is_ok_and(|b| b.contains("old-holder")) {
        assert!(Instant::now() < deadline, "the first holder never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = host_neighbour(&env.bridge, &ip);
    assert!(
        before.contains(&old_spec.network.mac),
        "the host resolved {ip} to the first holder: {before}"
    );
    d.delete(&old).await.unwrap();
    // Still naming the deleted holder's MAC: the state a node with a busy bridge is in.
    eprintln!("after the delete: {}", host_neighbour(&env.bridge, &ip));

    let new = conformance::new_id();
    let mut new_spec = env.spec(&new, serve("new-holder"));
    new_spec.network.ip.clone_from(&ip);
    new_spec.network.mac = format!("02:00:0a:d7:{:02x}:fe", env.subnet);
    d.create(&new_spec).await.unwrap();
    let after = host_neighbour(&env.bridge, &ip);
    assert!(
        after.contains(&new_spec.network.mac),
        "after the create, the host's entry for {ip} must name the new MAC {}: {after}",
        new_spec.network.mac
    );
    d.start(&new).await.unwrap();
    let started = Instant::now();
    let answered = loop {
        match http_once(addr) {
            Ok(b) if b.contains("new-holder") => break started.elapsed(),
            other => assert!(
                started.elapsed() < Duration::from_secs(3),
                "the new holder of {ip} did not answer within 3 s: {other:?} (neighbour: {})",
                host_neighbour(&env.bridge, &ip)
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("new holder of {ip} answered {answered:?} after start");
    d.delete(&new).await.unwrap();
    env.cleanup().await;
}
