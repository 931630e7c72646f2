//! CPU accounting around one benchmark transfer (used by `net_bench`): how much CPU time the
//! transfer cost, on which CPU, and how busy the machine was.
//!
//! Three measures, because other engineers' processes share the machine:
//!
//! - **path** (the main figure): all CPUs' busy time from `/proc/stat` (user, nice, system,
//!   irq, softirq; not idle, iowait or steal) minus the CPU time every *other* process used in
//!   the same window (`/proc/<pid>/stat` utime+stime of every process but the benchmark's
//!   iperf3s and the `ksoftirqd/N` threads, plus the time of children they reaped in the
//!   window). What remains is the benchmark's processes, the softirq threads, and softirq work
//!   that ran in the idle task's context (with RPS the receiving CPU often runs it there).
//!   This kernel has no `CONFIG_IRQ_TIME_ACCOUNTING`, so softirq work that ran on top of
//!   another process is charged to that process and subtracted: a slight under-count, and
//!   the figure is only as exact as the 10 ms ticks of both sources (the CPU-seconds of a
//!   whole 5 s transfer are several hundred ticks).
//! - **processes**: the CPU time of the benchmark's own processes (the iperf3 clients and
//!   servers, in a cgroup of their own: v1 `cpuacct.usage_percpu`, else v2 `cpu.stat`) plus
//!   the `ksoftirqd/N` threads (`/proc/<pid>/schedstat`), in nanoseconds and per CPU. The
//!   softirq work a task runs on its way out of a system call (where veth, bridge and VXLAN
//!   processing mostly happens: `netif_rx` then `local_bh_enable`) is charged to that task;
//!   softirq run in the idle task is not: a lower bound, which other processes cannot
//!   inflate.
//! - **machine**: the raw `/proc/stat` busy time, an upper bound (everyone's work), per CPU,
//!   with the busy rate of a 1 s background sample taken just before each transfer (the same
//!   machine with the benchmark idle) as the measure of the other processes' load.
//!
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Ticks per second of `/proc/stat` (`USER_HZ`, 100 on Linux x86).
const USER_HZ: f64 = 100.0;

/// A cgroup holding the benchmark's processes (removed on drop).
pub struct Group {
    dir: PathBuf,
    v1: bool,
}

impl Group {
    /// Creates the group `name` (cgroup v1 `cpuacct` if mounted, else cgroup v2).
    pub fn new(name: &str) -> Self {
        let v1 = PathBuf::from("/sys/fs/cgroup/cpuacct");
        let (root, is_v1) = if v1.join("cpuacct.usage_percpu").exists() {
            (v1, true)
        } else if PathBuf::from("/sys/fs/cgroup/cgroup.controllers").exists() {
            (PathBuf::from("/sys/fs/cgroup"), false)
        } else {
            (PathBuf::from("/sys/fs/cgroup/unified"), false)
        };
        let dir = root.join(name);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cgroup {}: {e}", dir.display()));
        Self { dir, v1: is_v1 }
    }

    /// A shell command prefix that moves itself into the group and then execs the rest:
    /// `sh -c '…; exec "$@"' sh ARGS…`.
    pub fn wrap(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new("sh");
        cmd.args([
            "-c",
            &format!(
                "echo $$ > {}/cgroup.procs && exec \"$@\"",
                self.dir.display()
            ),
            "sh",
        ])
        .args(args);
        cmd
    }

    /// CPU time of the group's processes so far, nanoseconds per CPU (v1), or all of it
    /// counted on CPU 0 (v2 has no per-CPU figure).
    fn usage(&self, cpus: usize) -> Vec<u64> {
        if self.v1 {
            let s = std::fs::read_to_string(self.dir.join("cpuacct.usage_percpu"))
                .expect("cpuacct.usage_percpu");
            let mut v: Vec<u64> = s
                .split_whitespace()
                .filter_map(|x| x.parse().ok())
                .collect();
            v.resize(cpus, 0);
            v
        } else {
            let s = std::fs::read_to_string(self.dir.join("cpu.stat")).expect("cpu.stat");
            let usec = s
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .and_then(|x| x.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let mut v = vec![0; cpus];
            v[0] = usec * 1000;
            v
        }
    }

    /// The pids in the group.
    fn pids(&self) -> Vec<u32> {
        std::fs::read_to_string(self.dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Whether the usage is known per CPU.
    pub fn per_cpu(&self) -> bool {
        self.v1
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// One CPU's `/proc/stat` counters: busy (user+nice+system+irq+softirq), idle (+iowait),
/// steal, softirq; in ticks.
#[derive(Clone, Copy, Default)]
struct Ticks {
    busy: u64,
    idle: u64,
    steal: u64,
    softirq: u64,
}

fn proc_stat() -> Vec<Ticks> {
    let s = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    s.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .map(|x| x.parse().unwrap_or(0))
                .collect();
            let at = |i: usize| f.get(i).copied().unwrap_or(0);
            // user nice system idle iowait irq softirq steal (guest is inside user)
            Ticks {
                busy: at(0) + at(1) + at(2) + at(5) + at(6),
                idle: at(3) + at(4),
                steal: at(7),
                softirq: at(6),
            }
        })
        .collect()
}

/// Every process's own CPU time (utime+stime) and its reaped children's (cutime+cstime), in
/// ticks, by pid; and the pids of the `ksoftirqd/N` threads.
fn processes() -> (HashMap<u32, (u64, u64)>, Vec<u32>) {
    let mut all = HashMap::new();
    let mut softirqd = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if head.ends_with("(ksoftirqd") || head.contains("(ksoftirqd/") {
            softirqd.push(pid);
        }
        // After the comm: state ppid pgrp session tty tpgid flags minflt cminflt majflt
        // cmajflt utime stime cutime cstime ...
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(1)
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        if f.len() > 13 {
            all.insert(pid, (f[10] + f[11], f[12] + f[13]));
        }
    }
    (all, softirqd)
}

/// Nanoseconds each CPU's `ksoftirqd/N` has run.
fn ksoftirqd(cpus: usize) -> Vec<u64> {
    let mut v = vec![0; cpus];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let comm = std::fs::read_to_string(e.path().join("comm")).unwrap_or_default();
        let Some(n) = comm.trim().strip_prefix("ksoftirqd/") else {
            continue;
        };
        let Ok(n) = n.parse::<usize>() else { continue };
        let ns = std::fs::read_to_string(e.path().join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        if n < cpus {
            v[n] = ns;
        }
    }
    v
}

/// The counters at one instant.
#[derive(Clone)]
pub struct Snapshot {
    at: Instant,
    stat: Vec<Ticks>,
    group: Vec<u64>,
    softirqd: Vec<u64>,
    procs: HashMap<u32, (u64, u64)>,
    exclude: Vec<u32>,
}

/// Takes a snapshot of the machine's and the group's counters.
pub fn snapshot(g: &Group) -> Snapshot {
    let (procs, mut exclude) = processes();
    exclude.extend(g.pids());
    let stat = proc_stat();
    let cpus = stat.len();
    Snapshot {
        procs,
        exclude,
        at: Instant::now(),
        group: g.usage(cpus),
        softirqd: ksoftirqd(cpus),
        stat,
    }
}

/// What a transfer cost, per CPU, in CPU-seconds, and how long it took.
#[derive(Clone, Debug, Default)]
pub struct Usage {
    /// Wall-clock seconds of the window.
    pub wall: f64,
    /// The benchmark's processes plus the softirq threads, per CPU.
    pub attributed: Vec<f64>,
    /// All busy time per CPU (`/proc/stat`), background included.
    pub busy: Vec<f64>,
    /// Softirq time per CPU (`/proc/stat`, whoever it ran for).
    pub softirq: Vec<f64>,
    /// Time the hypervisor ran something else, per CPU.
    pub steal: Vec<f64>,
    /// Busy CPU-seconds per second of the whole machine in the background sample before.
    pub background: f64,
    /// CPU-seconds all other processes used in the window.
    pub others: f64,
}

impl Usage {
    /// Sum of the attributed CPU-seconds.
    pub fn attributed_total(&self) -> f64 {
        self.attributed.iter().sum()
    }
    /// Machine busy CPU-seconds, all CPUs.
    pub fn busy_total(&self) -> f64 {
        self.busy.iter().sum()
    }
    /// The path's CPU-seconds: machine busy time minus the other processes' time.
    pub fn path(&self) -> f64 {
        (self.busy_total() - self.others).max(0.0)
    }
}

/// Usage between `before` and `after`, with the background rate measured from `idle` (a
/// snapshot taken before `before` with the benchmark idle in between).
pub fn usage(idle: &Snapshot, before: &Snapshot, after: &Snapshot) -> Usage {
    let tick = |a: &Snapshot, b: &Snapshot, f: fn(&Ticks) -> u64| -> Vec<f64> {
        a.stat
            .iter()
            .zip(&b.stat)
            .map(|(x, y)| f(y).saturating_sub(f(x)) as f64 / USER_HZ)
            .collect()
    };
    let ns = |a: &[u64], b: &[u64]| -> Vec<f64> {
        a.iter()
            .zip(b)
            .map(|(x, y)| y.saturating_sub(*x) as f64 / 1e9)
            .collect()
    };
    let group = ns(&before.group, &after.group);
    let softirqd = ns(&before.softirqd, &after.softirqd);
    let idle_secs = (before.at - idle.at).as_secs_f64().max(1e-3);
    Usage {
        wall: (after.at - before.at).as_secs_f64(),
        attributed: group.iter().zip(&softirqd).map(|(a, b)| a + b).collect(),
        busy: tick(before, after, |t| t.busy),
        softirq: tick(before, after, |t| t.softirq),
        steal: tick(before, after, |t| t.steal),
        background: tick(idle, before, |t| t.busy).iter().sum::<f64>() / idle_secs,
        others: others(before, after) as f64 / USER_HZ,
    }
}

/// Ticks other processes used between the snapshots: the own time of every process not
/// excluded (new ones in full), plus what every surviving process's reaped children used
/// (our own process's children are the iperf3 clients, excluded), minus what the processes
/// that were reaped had already used before the window.
fn others(before: &Snapshot, after: &Snapshot) -> u64 {
    let me = std::process::id();
    let ours = |p: &u32| before.exclude.contains(p) || after.exclude.contains(p);
    let mut sum: i64 = 0;
    for (pid, (cpu, children)) in &after.procs {
        let (cpu0, children0) = before.procs.get(pid).copied().unwrap_or((0, 0));
        if !ours(pid) {
            sum += *cpu as i64 - cpu0 as i64;
        }
        if *pid != me && before.procs.contains_key(pid) {
            sum += *children as i64 - children0 as i64;
        }
    }
    for (pid, (cpu, children)) in &before.procs {
        if !after.procs.contains_key(pid) && !ours(pid) {
            sum -= (*cpu + *children) as i64;
        }
    }
    sum.max(0) as u64
}

/// The background sample's length before each transfer.
pub const BACKGROUND: Duration = Duration::from_millis(1000);

/// The 1-minute load average.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_default()
}
