//! Control-plane write path: committed creates through Raft (fsync) via the REST API, against a
//! single-member etcd driven through its v3 HTTP JSON gateway with the same HTTP client.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::json;

use crate::harness::{workdir, Etcd, Nimbus};

mod cluster;
use crate::stats::{ms, Summary};

/// Options of `nimbus-bench writes`.
#[derive(Debug, clap::Args)]
pub struct WritesArgs {
    /// The product binary.
    #[arg(long, default_value = "target/release/nimbus")]
    pub nimbus_bin: PathBuf,
    /// Sequential writes measured with a single client.
    #[arg(long, default_value_t = 2000)]
    pub single_count: u64,
    /// Concurrent clients.
    #[arg(long, default_value_t = 64)]
    pub clients: usize,
    /// Measured seconds of the concurrent phase.
    #[arg(long, default_value_t = 10)]
    pub secs: u64,
    /// Update this markdown file's "## Control-plane writes" section.
    #[arg(long)]
    pub doc: Option<PathBuf>,
    /// The command line to quote in the document.
    #[arg(long, default_value = "scripts/bench-writes")]
    pub command: String,
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
fn b64(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(char::from(B64[((n >> (18 - 6 * k)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Where writes go.
#[derive(Clone)]
enum Target {
    /// `POST /v1/projects` with a unique name (one Raft entry, fsynced, per request).
    Nimbus { url: String, token: String },
    /// `POST /v3/kv/put` with a unique key.
    Etcd { url: String, value: String },
}

impl Target {
    async fn write(&self, http: &reqwest::Client, prefix: &str, i: u64) -> anyhow::Result<()> {
        let resp = match self {
            Self::Nimbus { url, token } => {
                http.post(format!("{url}/v1/projects"))
                    .bearer_auth(token)
                    .json(&json!({ "name": format!("{prefix}{i}") }))
                    .send()
                    .await?
            }
            Self::Etcd { url, value } => {
                http.post(format!("{url}/v3/kv/put"))
                    .json(&json!({
                        "key": b64(format!("/bench/{prefix}{i}").as_bytes()),
                        "value": value,
                    }))
                    .send()
                    .await?
            }
        };
        let status = resp.status();
        let body = resp.bytes().await?;
        if !status.is_success() {
            bail!("HTTP {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(())
    }
}

/// Results of one system.
struct Measured {
    single: Summary,
    conc: Summary,
    rate: f64,
}

/// The load generator's client: keep-alive (one connection per concurrent client) or a new
/// connection (TCP + TLS handshake) per request; over TLS with `tls`.
fn http_client(
    tls: Option<rustls::ClientConfig>,
    keep_alive: bool,
) -> anyhow::Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .pool_max_idle_per_host(if keep_alive { 512 } else { 0 })
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(30));
    if let Some(tls) = tls {
        b = b.use_preconfigured_tls(tls);
    }
    Ok(b.build()?)
}

/// Sequential writes of one client that opens a new connection for each: latencies.
async fn measure_new_connections(
    target: &Target,
    tag: &str,
    count: u64,
    tls: Option<rustls::ClientConfig>,
) -> anyhow::Result<Summary> {
    let http = http_client(tls, false)?;
    let prefix = format!("c{}{tag}-", std::process::id());
    let mut lat = Vec::new();
    for i in 0..count + 20 {
        let t0 = Instant::now();
        target.write(&http, &prefix, i).await?;
        if i >= 20 {
            lat.push(t0.elapsed());
        }
    }
    Ok(Summary::of(&lat))
}

async fn measure(target: &Target, tag: &str, opts: &WritesArgs) -> anyhow::Result<Measured> {
    measure_with(target, tag, opts, None).await
}

async fn measure_with(
    target: &Target,
    tag: &str,
    opts: &WritesArgs,
    tls: Option<rustls::ClientConfig>,
) -> anyhow::Result<Measured> {
    let http = http_client(tls, true)?;
    let prefix = format!("w{}{tag}-", std::process::id());
    let next = Arc::new(AtomicU64::new(0));
    // Single client: warm-up, then sequential writes.
    for _ in 0..100 {
        target
            .write(&http, &prefix, next.fetch_add(1, Ordering::Relaxed))
            .await?;
    }
    let mut lat = Vec::new();
    for _ in 0..opts.single_count {
        let i = next.fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        target.write(&http, &prefix, i).await?;
        lat.push(t0.elapsed());
    }
    let single = Summary::of(&lat);
    // Concurrent clients: 1 s warm-up, then the measured window.
    let mut rate = 0.0;
    let mut conc = Summary::of(&[]);
    for (secs, measured) in [(1, false), (opts.secs, true)] {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(secs);
        let tasks: Vec<_> = (0..opts.clients)
            .map(|_| {
                let (tgt, client, pfx, counter) =
                    (target.clone(), http.clone(), prefix.clone(), next.clone());
                tokio::spawn(async move {
                    let mut lat = Vec::new();
                    while Instant::now() < deadline {
                        let idx = counter.fetch_add(1, Ordering::Relaxed);
                        let t0 = Instant::now();
                        tgt.write(&client, &pfx, idx).await?;
                        lat.push(t0.elapsed());
                    }
                    anyhow::Ok(lat)
                })
            })
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        if measured {
            rate = all.len() as f64 / start.elapsed().as_secs_f64();
            conc = Summary::of(&all);
        }
    }
    Ok(Measured { single, conc, rate })
}

fn print(label: &str, m: &Measured, clients: usize) {
    println!(
        "writes {label} 1 client: n={} p50={} ms p99={} ms | {clients} clients: {:.0} writes/s p50={} ms p99={} ms",
        m.single.n,
        ms(m.single.p50),
        ms(m.single.p99),
        m.rate,
        ms(m.conc.p50),
        ms(m.conc.p99)
    );
}

/// Runs the write benchmark.
pub async fn run(opts: &WritesArgs) -> anyhow::Result<()> {
    let dir = workdir("nimbus-bench-writes-")?;

    eprintln!("etcd: single member, data dir {}", dir.path().display());
    let mut etcd = Etcd::start(dir.path()).await?;
    let value = b64(&[b'v'; 100]);
    let e = measure(
        &Target::Etcd {
            url: etcd.url.clone(),
            value,
        },
        "e",
        opts,
    )
    .await;
    etcd.stop();
    let e = e?;
    print("etcd (v3 gateway put)", &e, opts.clients);

    eprintln!("nimbus: data dir {}", dir.path().display());
    let mut n = Nimbus::start(&opts.nimbus_bin, dir.path())?;
    let nres = measure(
        &Target::Nimbus {
            url: n.url.clone(),
            token: n.token.clone(),
        },
        "n",
        opts,
    )
    .await;
    let rss = crate::harness::rss_kib(n.pid());
    n.stop();
    let m = nres?;

    print("nimbus (POST /v1/projects)", &m, opts.clients);
    let r_single = m.single.p50.as_secs_f64() / e.single.p50.as_secs_f64();
    let r_rate = m.rate / e.rate;
    let single_ok = m.single.p50 <= Duration::from_millis(2);
    let rate_ok = m.rate >= 5000.0;
    println!(
        "writes ratio nimbus/etcd: 1-client p50 {r_single:.2}x (target p50<=2 ms {}) | {}-client writes/s {r_rate:.2}x (target >=5000/s {})",
        if single_ok { "MET" } else { "MISSED" },
        opts.clients,
        if rate_ok { "MET" } else { "MISSED" }
    );
    if let Some((rss, hwm)) = rss {
        eprintln!("nimbus VmRSS after the run: {rss} KiB (peak {hwm} KiB)");
    }
    let tls = tls_vs_plain(opts, dir.path()).await?;
    let cluster = cluster::cluster_tls_vs_plain(opts, dir.path()).await?;

    if let Some(doc) = &opts.doc {
        let mut b = String::new();
        let _ = writeln!(b, "- Machine: {}.", crate::doc::machine_note());
        let _ = writeln!(b, "- Build: {}.", crate::doc::build_note(&opts.nimbus_bin));
        let _ = writeln!(
            b,
            "- What is measured: HTTP request to answer, with one shared `reqwest` client \
             (HTTP/1.1 keep-alive, one connection per concurrent client) for both systems; the load \
             generator runs on the same 2 cores. nimbus: `POST /v1/projects` with a unique name \
             (a real create: validated, proposed as a Raft entry, fsynced by the single voter on \
             redb, applied, answered 201). etcd {}: single member started by the tool \
             (`--data-dir` next to nimbus's on the same ext4 disk, default fsync), \
             `POST /v3/kv/put` on the v3 HTTP JSON gateway with a unique base64 key and a 100-byte \
             value. Single client: {} sequential writes after 100 warm-up writes. {} clients: 1 s \
             warm-up, then {} s measured; writes/s = completed writes / wall time.",
            etcd_version(),
            opts.single_count,
            opts.clients,
            opts.secs
        );
        let _ = writeln!(
            b,
            "\n| system | 1 client p50 ms | 1 client p99 ms | {c} clients writes/s | {c} clients p50 ms | {c} clients p99 ms |",
            c = opts.clients
        );
        let _ = writeln!(b, "|---|---|---|---|---|---|");
        for (label, x) in [("etcd", &e), ("nimbus", &m)] {
            let _ = writeln!(
                b,
                "| {label} | {} | {} | {:.0} | {} | {} |",
                ms(x.single.p50),
                ms(x.single.p99),
                x.rate,
                ms(x.conc.p50),
                ms(x.conc.p99)
            );
        }
        let _ = writeln!(
            b,
            "| nimbus / etcd | {:.2}x | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
            r_single,
            m.single.p99.as_secs_f64() / e.single.p99.as_secs_f64(),
            r_rate,
            m.conc.p50.as_secs_f64() / e.conc.p50.as_secs_f64(),
            m.conc.p99.as_secs_f64() / e.conc.p99.as_secs_f64()
        );
        let _ = writeln!(
            b,
            "\nTargets: single-client p50 <= 2 ms: {} ({} ms). {} clients >= 5,000 writes/s: {} ({:.0}/s).",
            if single_ok { "**met**" } else { "**missed**" },
            ms(m.single.p50),
            opts.clients,
            if rate_ok { "**met**" } else { "**missed**" },
            m.rate
        );
        if !single_ok || !rate_ok {
            b.push_str(
                "\nLikely cause (from reading `crates/state/src/raft/log_writer.rs` at the time of \
                 this run, not profiled): openraft 0.9 hands each client write to storage on its \
                 own and waits for its flush before taking the next, so the leader pays one fsync \
                 per write and concurrent writes are serialized instead of group-committed \
                 (64-client writes/s is about 1 / single-client latency); the single-client gap to \
                 etcd, which also fsyncs every put, is spent elsewhere in the propose/apply path.\n",
            );
        }
        tls.describe(&mut b, opts);
        cluster.describe(&mut b, opts);
        let date = crate::doc::today();
        let mut rows = vec![
            crate::doc::Row {
                metric: "Control-plane writes: 1 client, p50 (`bench-writes`)".into(),
                target: "<= 2 ms".into(),
                result: format!("{} ms (etcd {} ms)", ms(m.single.p50), ms(e.single.p50)),
                ratio: format!("{r_single:.2}x etcd"),
                verdict: crate::doc::verdict(single_ok),
                date: date.clone(),
            },
            crate::doc::Row {
                metric: format!(
                    "Control-plane writes: {} clients, writes/s (`bench-writes`)",
                    opts.clients
                ),
                target: ">= 5,000/s".into(),
                result: format!("{:.0}/s (etcd {:.0}/s)", m.rate, e.rate),
                ratio: format!("{r_rate:.2}x etcd"),
                verdict: crate::doc::verdict(rate_ok),
                date: date.clone(),
            },
        ];
        rows.extend(tls.rows(opts, &date));
        rows.extend(cluster.rows(opts, &date));
        crate::doc::record(&crate::doc::Record {
            doc,
            script: "bench-writes",
            heading: "## Control-plane writes",
            command: &opts.command,
            body: &b,
            rows: &rows,
        })?;
    }
    Ok(())
}

/// `nimbus server` over TLS 1.3 against `nimbus server --insecure`, same load, same run.
struct TlsVsPlain {
    plain: Measured,
    tls: Measured,
    plain_new: Summary,
    tls_new: Summary,
}

impl TlsVsPlain {
    fn p50_ratio(&self) -> f64 {
        self.tls.single.p50.as_secs_f64() / self.plain.single.p50.as_secs_f64()
    }

    fn rate_ratio(&self) -> f64 {
        self.tls.rate / self.plain.rate
    }

    fn new_conn_ratio(&self) -> f64 {
        self.tls_new.p50.as_secs_f64() / self.plain_new.p50.as_secs_f64()
    }

    fn describe(&self, b: &mut String, opts: &WritesArgs) {
        let _ = writeln!(
            b,
            "\n### TLS vs plain\n\nThe same writes against a lone `nimbus server` (no local agent), once with \
             `--insecure` (plain HTTP) and once over TLS 1.3 with its internal CA (ECDSA P-256 \
             certificate, TLS13_AES_128_GCM_SHA256 negotiated first, no session resumption), in \
             ABBA order (plain, TLS, TLS, plain: a fresh server each round), each figure the mean \
             of its two rounds. Keep-alive rows reuse connections as above; the \
             new-connection row opens a TCP connection and does a full handshake for each of \
             {} sequential writes per round (after 20 warm-up writes).\n",
            self.plain_new.n / 2
        );
        let _ = writeln!(
            b,
            "| server | keep-alive 1 client p50 ms | keep-alive 1 client p99 ms | {c} clients writes/s | {c} clients p50 ms | new connection 1 client p50 ms | new connection p99 ms |",
            c = opts.clients
        );
        let _ = writeln!(b, "|---|---|---|---|---|---|---|");
        for (label, m, n) in [
            ("plain (`--insecure`)", &self.plain, &self.plain_new),
            ("TLS 1.3", &self.tls, &self.tls_new),
        ] {
            let _ = writeln!(
                b,
                "| {label} | {} | {} | {:.0} | {} | {} | {} |",
                ms(m.single.p50),
                ms(m.single.p99),
                m.rate,
                ms(m.conc.p50),
                ms(n.p50),
                ms(n.p99)
            );
        }
        let _ = writeln!(
            b,
            "| TLS / plain | {:.2}x | {:.2}x | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
            self.p50_ratio(),
            self.tls.single.p99.as_secs_f64() / self.plain.single.p99.as_secs_f64(),
            self.rate_ratio(),
            self.tls.conc.p50.as_secs_f64() / self.plain.conc.p50.as_secs_f64(),
            self.new_conn_ratio(),
            self.tls_new.p99.as_secs_f64() / self.plain_new.p99.as_secs_f64()
        );
        let _ = writeln!(
            b,
            "\nTargets: TLS keep-alive p50 <= 1.15x plain: {} ({:.2}x). TLS {} clients writes/s >= 0.9x plain: {} ({:.2}x).",
            if self.p50_ratio() <= 1.15 { "**met**" } else { "**missed**" },
            self.p50_ratio(),
            opts.clients,
            if self.rate_ratio() >= 0.9 { "**met**" } else { "**missed**" },
            self.rate_ratio()
        );
    }

    fn rows(&self, opts: &WritesArgs, date: &str) -> Vec<crate::doc::Row> {
        vec![
            crate::doc::Row {
                metric: "Control-plane writes over TLS: 1 client p50, TLS / plain (`bench-writes`)".into(),
                target: "<= 1.15x".into(),
                result: format!("{} ms (plain {} ms)", ms(self.tls.single.p50), ms(self.plain.single.p50)),
                ratio: format!("{:.2}x plain", self.p50_ratio()),
                verdict: crate::doc::verdict(self.p50_ratio() <= 1.15),
                date: date.to_owned(),
            },
            crate::doc::Row {
                metric: format!(
                    "Control-plane writes over TLS: {} clients writes/s, TLS / plain (`bench-writes`)",
                    opts.clients
                ),
                target: ">= 0.9x".into(),
                result: format!("{:.0}/s (plain {:.0}/s)", self.tls.rate, self.plain.rate),
                ratio: format!("{:.2}x plain", self.rate_ratio()),
                verdict: crate::doc::verdict(self.rate_ratio() >= 0.9),
                date: date.to_owned(),
            },
        ]
    }
}

/// The mean of two summaries (field by field).
fn mean_summary(a: &Summary, b: &Summary) -> Summary {
    let m = |x: Duration, y: Duration| (x + y) / 2;
    Summary {
        n: a.n + b.n,
        min: a.min.min(b.min),
        p50: m(a.p50, b.p50),
        p90: m(a.p90, b.p90),
        p99: m(a.p99, b.p99),
        max: a.max.max(b.max),
    }
}

fn mean_measured(a: &Measured, b: &Measured) -> Measured {
    Measured {
        single: mean_summary(&a.single, &b.single),
        conc: mean_summary(&a.conc, &b.conc),
        rate: f64::midpoint(a.rate, b.rate),
    }
}

/// Plain and TLS servers in ABBA order (plain, TLS, TLS, plain), each figure the mean of its
/// two rounds, so a drift in the machine's load (other work on the same cores) weighs on both.
async fn tls_vs_plain(opts: &WritesArgs, dir: &std::path::Path) -> anyhow::Result<TlsVsPlain> {
    let new_count = opts.single_count.min(500);
    let mut plain_runs = Vec::new();
    let mut tls_runs = Vec::new();
    for (round, (name, tls)) in [
        ("plain", false),
        ("tls", true),
        ("tls", true),
        ("plain", false),
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = crate::harness::ApiServer::start(
            &opts.nimbus_bin,
            dir,
            &format!("server-{name}-{round}"),
            tls,
        )?;
        let cfg = s.tls_config()?;
        let target = Target::Nimbus {
            url: s.url.clone(),
            token: s.token.clone(),
        };
        let tag = format!("{}{round}", &name[..1]);
        let m = measure_with(&target, &tag, opts, cfg.clone()).await;
        let n = measure_new_connections(&target, &tag, new_count, cfg).await;
        s.stop();
        let (m, n) = (m?, n?);
        print(
            &format!("nimbus server {name} (round {round}) keep-alive"),
            &m,
            opts.clients,
        );
        println!(
            "writes nimbus server {name} (round {round}) new connection per write, 1 client: n={} p50={} ms p99={} ms",
            n.n,
            ms(n.p50),
            ms(n.p99)
        );
        if tls {
            tls_runs.push((m, n));
        } else {
            plain_runs.push((m, n));
        }
    }
    let (plain, plain_new) = (
        mean_measured(&plain_runs[0].0, &plain_runs[1].0),
        mean_summary(&plain_runs[0].1, &plain_runs[1].1),
    );
    let (tls, tls_new) = (
        mean_measured(&tls_runs[0].0, &tls_runs[1].0),
        mean_summary(&tls_runs[0].1, &tls_runs[1].1),
    );
    let r = TlsVsPlain {
        plain,
        tls,
        plain_new,
        tls_new,
    };
    println!(
        "writes ratio TLS/plain: 1-client p50 {:.2}x (target <=1.15x {}) | {}-client writes/s {:.2}x (target >=0.9x {}) | new-connection p50 {:.2}x",
        r.p50_ratio(),
        if r.p50_ratio() <= 1.15 { "MET" } else { "MISSED" },
        opts.clients,
        r.rate_ratio(),
        if r.rate_ratio() >= 0.9 { "MET" } else { "MISSED" },
        r.new_conn_ratio()
    );
    Ok(r)
}

fn etcd_version() -> String {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(|l| l.trim_start_matches("etcd Version:").trim().to_string())
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::b64;

    #[test]
    fn base64() {
        assert_eq!(b64(b""), "");
        assert_eq!(b64(b"f"), "Zg==");
        assert_eq!(b64(b"fo"), "Zm8=");
        assert_eq!(b64(b"foo"), "Zm9v");
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
    }
}
