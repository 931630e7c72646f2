//! Node utilisation the agent measures and sends with every heartbeat: CPU busy time from
//! `/proc/stat`, memory in use (`MemTotal − MemAvailable`) from `/proc/meminfo`, and network
//! throughput from the interface counters of the node's physical interfaces (read over
//! netlink with `nimbus_net`), against their link speed (`/sys/class/net/<if>/speed`).
//!
//! CPU and network are rates, so the first sample after start only records counters; every
//! later one reports the change since the previous sample. Network utilisation is the busier
//! direction: `max(Δrx, Δtx) × 8 / (Δt × speed)`. Nodes without a physical interface of known
//! speed (virtual machines, network namespaces) report network capacity 0 and utilisation 0.
//! The pure parts (parsers and rate math) are unit tested; [`Sampler`] does the reading.

use std::path::Path;
use std::time::Instant;

use nimbus_api::agent::HeartbeatRequest;

/// Cumulative CPU times from the `cpu` line of `/proc/stat` (clock ticks).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// All time (user .. steal).
    pub total: u64,
    /// Idle time (idle + iowait).
    pub idle: u64,
}

/// Parses the aggregate `cpu` line of `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    if v.len() < 4 {
        return None;
    }
    let idle = v[3] + v.get(4).copied().unwrap_or(0);
    Some(CpuTimes {
        total: v.iter().sum(),
        idle,
    })
}

/// The busy fraction (0..=1) between two samples; `None` if no time passed.
pub fn cpu_fraction(prev: CpuTimes, cur: CpuTimes) -> Option<f64> {
    let total = cur.total.checked_sub(prev.total)?;
    let idle = cur.idle.checked_sub(prev.idle)?;
    if total == 0 {
        return None;
    }
    Some((total.saturating_sub(idle) as f64 / total as f64).clamp(0.0, 1.0))
}

/// `(MemTotal, MemAvailable)` in bytes from `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    };
    Some((field("MemTotal:")?, field("MemAvailable:")?))
}

/// Network utilisation (0..=1) of a link of `mbps` Mbit/s that moved `rx` and `tx` bytes in
/// `secs` seconds (the busier direction counts).
pub fn net_fraction(rx: u64, tx: u64, secs: f64, mbps: u64) -> f64 {
    if mbps == 0 || secs <= 0.0 {
        return 0.0;
    }
    let bits = rx.max(tx) as f64 * 8.0;
    (bits / (secs * mbps as f64 * 1e6)).clamp(0.0, 1.0)
}

/// The node's physical interfaces (those backed by a device) and their speed in Mbit/s
/// (interfaces whose speed the kernel does not know are left out).
pub fn physical_interfaces(sys_class_net: &Path) -> Vec<(String, u64)> {
    let Ok(dir) = std::fs::read_dir(sys_class_net) else {
        return Vec::new();
    };
    let mut out: Vec<(String, u64)> = dir
        .filter_map(Result::ok)
        .filter(|e| e.path().join("device").exists())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let speed = std::fs::read_to_string(e.path().join("speed"))
                .ok()?
                .trim()
                .parse::<i64>()
                .ok()
                .filter(|s| *s > 0)?;
            Some((name, u64::try_from(speed).ok()?))
        })
        .collect();
    out.sort();
    out
}

#[derive(Debug, Clone, Copy)]
struct NetSample {
    rx: u64,
    tx: u64,
    at: Instant,
}

/// Reads the node's counters and turns consecutive samples into a heartbeat's measurement.
#[derive(Debug, Default)]
pub struct Sampler {
    cpu: Option<CpuTimes>,
    net: Option<NetSample>,
}

impl Sampler {
    /// A sampler with no previous sample.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes a sample and returns the heartbeat to send: `measured` is false until CPU has
    /// two samples to compare.
    pub async fn sample(&mut self) -> HeartbeatRequest {
        let mut hb = HeartbeatRequest::default();
        let cur = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|t| parse_proc_stat(&t));
        let cpu = match (self.cpu, cur) {
            (Some(prev), Some(cur)) => cpu_fraction(prev, cur),
            _ => None,
        };
        self.cpu = cur;
        let Some(cpu) = cpu else {
            // Prime the network counters too.
            let _ = self.network().await;
            return hb;
        };
        hb.measured = true;
        hb.cpu_utilisation = cpu;
        if let Some((total, available)) = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| parse_meminfo(&t))
        {
            hb.memory_used_bytes = total.saturating_sub(available);
        }
        let (fraction, mbps) = self.network().await;
        hb.network_utilisation = fraction;
        hb.network_mbps = mbps;
        hb
    }

    /// `(utilisation, capacity Mbit/s)` of the physical interfaces since the last call.
    async fn network(&mut self) -> (f64, u64) {
        let ifaces = physical_interfaces(Path::new("/sys/class/net"));
        let mbps: u64 = ifaces.iter().map(|(_, s)| s).sum();
        if ifaces.is_empty() {
            return (0.0, 0);
        }
        let Ok(nl) = nimbus_net::Netlink::connect().await else {
            return (0.0, mbps);
        };
        let (mut rx, mut tx) = (0u64, 0u64);
        for (name, _) in &ifaces {
            if let Ok(Some(c)) = nl.counters(name).await {
                rx += c.rx_bytes;
                tx += c.tx_bytes;
            }
        }
        let now = NetSample {
            rx,
            tx,
            at: Instant::now(),
        };
        let fraction = self.net.map_or(0.0, |prev| {
            net_fraction(
                now.rx.saturating_sub(prev.rx),
                now.tx.saturating_sub(prev.tx),
                now.at.duration_since(prev.at).as_secs_f64(),
                mbps,
            )
        });
        self.net = Some(now);
        (fraction, mbps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT_A: &str = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 50 0 25 400 25 0 0 0 0 0\nintr 1\n";
    const STAT_B: &str = "cpu  160 0 90 850 50 0 0 0 0 0\ncpu0 80 0 45 425 25 0 0 0 0 0\nintr 2\n";

    #[test]
    fn cpu_busy_fraction_between_two_samples() {
        let a = parse_proc_stat(STAT_A).unwrap();
        let b = parse_proc_stat(STAT_B).unwrap();
        assert_eq!(
            a,
            CpuTimes {
                total: 1000,
                idle: 850
            }
        );
        // 150 ticks passed, 50 of them idle.
        let f = cpu_fraction(a, b).unwrap();
        assert!((f - 100.0 / 150.0).abs() < 1e-9, "{f}");
        assert_eq!(cpu_fraction(a, a), None);
        assert_eq!(cpu_fraction(b, a), None, "counters never go back");
        assert_eq!(parse_proc_stat("intr 1\n"), None);
    }

    #[test]
    fn memory_in_use_from_meminfo() {
        let m = "MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   18000000 kB\n";
        assert_eq!(
            parse_meminfo(m),
            Some((24_000_000 * 1024, 18_000_000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn network_fraction_counts_the_busier_direction() {
        // 1 Gbit/s link, 2 s, 125 MB received (500 Mbit/s) and 25 MB sent.
        let f = net_fraction(125_000_000, 25_000_000, 2.0, 1000);
        assert!((f - 0.5).abs() < 1e-9, "{f}");
        assert!(net_fraction(1, 1, 1.0, 0).abs() < 1e-12, "unknown speed");
        assert!(
            (net_fraction(u64::MAX, 0, 1.0, 1) - 1.0).abs() < 1e-12,
            "clamped"
        );
    }

    #[test]
    fn physical_interfaces_have_a_device_and_a_speed() {
        let dir = tempfile::tempdir().unwrap();
        let mk = |name: &str, device: bool, speed: &str| {
            let p = dir.path().join(name);
            std::fs::create_dir_all(&p).unwrap();
            if device {
                std::fs::create_dir_all(p.join("device")).unwrap();
            }
            std::fs::write(p.join("speed"), speed).unwrap();
        };
        mk("eth0", true, "1000\n");
        mk("eth1", true, "-1\n");
        mk("veth1", false, "10000\n");
        mk("eno2", true, "25000\n");
        assert_eq!(
            physical_interfaces(dir.path()),
            vec![("eno2".to_owned(), 25_000), ("eth0".to_owned(), 1000)]
        );
    }
}
