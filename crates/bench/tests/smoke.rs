//! Benchmarks cannot rot: runs every `scripts/bench-*` in its smoke mode (`BENCH_SMOKE=1`: a
//! few iterations of the debug build, nothing recorded) and fails when one fails, when one
//! leaves something behind, or when one rewrites `docs/`.
//!
//! Each script runs in a network and mount namespace of its own (`unshare --net --mount`, with a
//! private `/run/netns`), so links, nftables tables, named network namespaces and mounts that it
//! leaves are told apart exactly from those of the other clouds on this machine: they are the
//! difference between an inventory taken inside before and after the script. Processes and runc
//! containers are attributed through the run's directory (`TMPDIR` points into it, so every data
//! directory, bundle and temporary file lies under it) and through a marker variable inherited by
//! every process the script starts; its `TMPDIR` must be empty again afterwards. Processes and
//! containers found are reported, then killed or deleted, so a failing run leaves little.
//!
//! `BENCH_SMOKE_ONLY=bench-a,bench-b` runs only those (while working on one).
//!
//! Needs root, `unshare`/`nsenter` (util-linux), `ip`, `nft`, and each script's own dependencies
//! (`scripts/setup` installs them; under `CI=true` a missing one fails the script, otherwise the
//! script skips itself).

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Every benchmark script, run in this order. Adding a script is one line here (the test below
/// fails while a `scripts/bench-*` is missing from this list).
const SCRIPTS: &[&str] = &[
    "bench-scheduler",
    "bench-writes",
    "bench-launch",
    "bench-memory",
    "bench-scheduler-api",
    "bench-lb",
    "bench-lb-cost",
    "bench-failover",
    "bench-net",
    "bench-vip",
    "bench-vm",
    "bench-scale",
];

/// The smoke modes together are meant to take at most 5 minutes on the 2-core development
/// machine; past twice that, one of them has stopped being a smoke run.
const BUDGET: Duration = Duration::from_secs(600);
/// One script's limit.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(480);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[test]
fn every_benchmark_script_has_a_smoke_run() {
    let mut found: Vec<String> = std::fs::read_dir(repo().join("scripts"))
        .expect("scripts/")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("bench-") && !n.contains('.'))
        .collect();
    found.sort();
    let mut listed: Vec<String> = SCRIPTS.iter().map(ToString::to_string).collect();
    listed.sort();
    assert_eq!(
        found, listed,
        "crates/bench/tests/smoke.rs SCRIPTS must list every scripts/bench-*"
    );
}

/// Runs `bash -c script` inside the namespaces: takes the inventory into `dir/before` and
/// `dir/after` around the benchmark script given as `$1`.
const WRAPPER: &str = r#"
set -u
ip link set lo up
mkdir -p /run/netns
mount -t tmpfs -o mode=0755 nbsmoke /run/netns
inventory() {
    ip -o link show | awk -F': ' '{ sub(/@.*/, "", $2); print "link " $2 }'
    nft list tables | sed 's/^table /nft table /'
    ls /run/netns | sed 's/^/netns /'
    awk -v d="$SMOKE_DIR" 'index($5, d) == 1 || index($5, "/run/netns/") == 1 { print "mount " $5 }' /proc/self/mountinfo
}
inventory | sort > "$SMOKE_DIR/before"
"$1"
rc=$?
inventory | sort > "$SMOKE_DIR/after"
exit $rc
"#;

/// Processes started by the run: they carry its marker or name its directory.
fn run_processes(dir: &Path, marker: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let dir_s = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        let marked = environ.split(|b| *b == 0).any(|v| v == marker.as_bytes());
        if marked || cmd.contains(&dir_s) {
            out.push((pid, cmd.trim().to_string()));
        }
    }
    out
}

/// runc containers (any root under /run) whose state names the run's directory.
fn run_containers(dir: &Path) -> Vec<(PathBuf, String)> {
    let dir_s = dir.to_string_lossy().into_owned();
    let mut out = Vec::new();
    let mut stack: Vec<(PathBuf, usize)> = vec![(PathBuf::from("/run"), 0)];
    while let Some((d, depth)) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p == Path::new("/run/netns") || p.starts_with("/run/user") {
                continue;
            }
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() && depth < 5 {
                stack.push((p, depth + 1));
            } else if ft.is_file() && e.file_name() == "state.json" {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                if text.contains(&dir_s) {
                    let id = p
                        .parent()
                        .and_then(Path::file_name)
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let root = p.parent().and_then(Path::parent).map(Path::to_path_buf);
                    out.push((root.unwrap_or_default(), id));
                }
            }
        }
    }
    out
}

/// A digest of `docs/` (file names, sizes and contents).
fn docs_digest() -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![repo().join("docs")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out.sort();
    out
}

fn lines(path: &Path) -> BTreeSet<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// What one smoke run did.
struct Outcome {
    script: &'static str,
    took: Duration,
    skipped: bool,
    problems: Vec<String>,
}

fn tail(text: &str, n: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

fn smoke(script: &'static str, base: &Path) -> Outcome {
    let dir = base.join(script);
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).expect("run dir");
    let marker = format!("NIMBUS_BENCH_SMOKE_RUN={}", dir.display());
    let log_path = dir.join("output.log");
    let log = std::fs::File::create(&log_path).expect("log");
    let started = Instant::now();
    let mut cmd = Command::new("unshare");
    // Cargo sets these for this test; a nested cargo would see them as a changed build
    // environment (build scripts track e.g. CARGO_MANIFEST_DIR) and rebuild half the workspace.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_BIN_EXE_")
            || k.starts_with("CARGO_MANIFEST_")
            || [
                "CARGO_CRATE_NAME",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&k.as_ref())
        {
            cmd.env_remove(k.as_ref());
        }
    }
    let mut child = cmd
        .args(["--net", "--mount", "--propagation", "private", "--"])
        .args(["bash", "-c", WRAPPER, "smoke-wrapper"])
        .arg(repo().join("scripts").join(script))
        .current_dir(repo())
        .env("BENCH_SMOKE", "1")
        .env("TMPDIR", &tmp)
        .env("SMOKE_DIR", &dir)
        .env("NIMBUS_BENCH_SMOKE_RUN", dir.display().to_string())
        // No network inside: cargo must not try to reach a registry.
        .env("CARGO_NET_OFFLINE", "true")
        .env("CARGO_TERM_COLOR", "never")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .process_group(0)
        .spawn()
        .expect("unshare (util-linux)");
    let status = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break Some(st);
        }
        if started.elapsed() > SCRIPT_TIMEOUT {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = started.elapsed();
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut problems = Vec::new();
    match status {
        Some(st) if st.success() => {}
        Some(st) => problems.push(format!("exited with {st}:\n{}", tail(&output, 40))),
        None => problems.push(format!(
            "still running after {} s:\n{}",
            SCRIPT_TIMEOUT.as_secs(),
            tail(&output, 40)
        )),
    }
    // What the namespaces hold after the script that they did not hold before it.
    let (before, after) = (lines(&dir.join("before")), lines(&dir.join("after")));
    if status.is_some() && after.is_empty() {
        problems.push("no inventory after the script (the wrapper failed)".into());
    }
    for item in after.difference(&before) {
        problems.push(format!("left behind: {item}"));
    }
    // Give processes that were signalled at the end a moment to go.
    let mut procs = run_processes(&dir, &marker);
    for _ in 0..20 {
        if procs.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
        procs = run_processes(&dir, &marker);
    }
    for (pid, cmd) in &procs {
        problems.push(format!("left behind: process {pid} {cmd}"));
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for (root, id) in run_containers(&dir) {
        problems.push(format!(
            "left behind: runc container {id} (root {})",
            root.display()
        ));
        let _ = Command::new("runc")
            .arg("--root")
            .arg(&root)
            .args(["delete", "--force", &id])
            .stderr(Stdio::null())
            .status();
    }
    // Temporary files and directories: everything went to TMPDIR, which must be empty again.
    for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
        problems.push(format!("left behind: file {}", e.path().display()));
    }
    // Shown with --nocapture, or when the test fails.
    println!("===== {script} (smoke) =====\n{output}");
    let skipped = output.lines().any(|l| l.starts_with("SKIPPED:"));
    Outcome {
        script,
        took,
        skipped,
        problems,
    }
}

#[test]
fn smoke_every_benchmark() {
    let root = nix::unistd::geteuid().is_root();
    if !nimbus_testkit::require("root", root)
        || !nimbus_testkit::require("unshare (util-linux)", nimbus_testkit::have("unshare"))
    {
        return;
    }
    let base = tempfile::Builder::new()
        .prefix("nimbus-bench-smoke-")
        .tempdir_in("/var/tmp")
        .expect("temp dir");
    let docs = docs_digest();
    let started = Instant::now();
    let mut outcomes = Vec::new();
    let only = std::env::var("BENCH_SMOKE_ONLY").unwrap_or_default();
    for script in SCRIPTS {
        if !only.is_empty() && !only.split(',').any(|s| s == *script) {
            continue;
        }
        eprintln!("smoke: {script} ...");
        let o = smoke(script, base.path());
        eprintln!(
            "smoke: {script}: {} in {:.1} s",
            if !o.problems.is_empty() {
                "FAILED"
            } else if o.skipped {
                "skipped (missing dependency)"
            } else {
                "ok"
            },
            o.took.as_secs_f64()
        );
        outcomes.push(o);
    }
    let total = started.elapsed();
    eprintln!("smoke: all scripts in {:.1} s", total.as_secs_f64());
    let mut failures: Vec<String> = outcomes
        .iter()
        .flat_map(|o| o.problems.iter().map(move |p| format!("{}: {p}", o.script)))
        .collect();
    if docs_digest() != docs {
        failures.push("a smoke run changed docs/".into());
    }
    if total > BUDGET {
        failures.push(format!(
            "the smoke runs took {:.0} s together (budget 300 s, limit {} s)",
            total.as_secs_f64(),
            BUDGET.as_secs()
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
