//! Writes on a 3-server cluster: Raft over mTLS (TLS servers, the others joined with `--join`
//! and `--ca`) against the same cluster with `--insecure` (plain HTTP between servers), same
//! load, same run, ABBA order.

use std::fmt::Write as _;
use std::path::Path;

use super::{mean_measured, measure_with, print, Measured, Target, WritesArgs};
use crate::harness::ApiServer;
use crate::stats::ms;

/// The servers of a cluster (the first bootstrapped it and leads).
struct Cluster(Vec<ApiServer>);

impl Cluster {
    fn start(bin: &Path, dir: &Path, name: &str, tls: bool) -> anyhow::Result<Self> {
        let first = ApiServer::start_with(
            bin,
            dir,
            &format!("{name}-0"),
            tls,
            &["--bootstrap-expect".into(), "1".into()],
        )?;
        let d0 = dir.join(format!("{name}-0"));
        let mut extra: Vec<String> = vec![
            "--join".into(),
            first.url.clone(),
            "--cluster-secret-file".into(),
            d0.join("cluster.secret").display().to_string(),
            "--admin-token-file".into(),
            d0.join("admin.token").display().to_string(),
        ];
        if tls {
            extra.extend(["--ca".into(), d0.join("pki/ca.crt").display().to_string()]);
        }
        let mut servers = vec![first];
        for i in 1..3 {
            servers.push(ApiServer::start_with(
                bin,
                dir,
                &format!("{name}-{i}"),
                tls,
                &extra,
            )?);
        }
        Ok(Self(servers))
    }

    fn stop(&mut self) {
        for s in &mut self.0 {
            s.stop();
        }
    }
}

/// mTLS and plain 3-server clusters, each figure the mean of two rounds.
pub(super) struct ClusterTlsVsPlain {
    plain: Measured,
    tls: Measured,
}

impl ClusterTlsVsPlain {
    fn p50_ratio(&self) -> f64 {
        self.tls.single.p50.as_secs_f64() / self.plain.single.p50.as_secs_f64()
    }

    fn rate_ratio(&self) -> f64 {
        self.tls.rate / self.plain.rate
    }

    pub(super) fn describe(&self, b: &mut String, opts: &WritesArgs) {
        let _ = writeln!(
            b,
            "\n### 3-server cluster: Raft over mTLS vs plain\n\nThe same keep-alive writes \
             through the leader of three `nimbus server`s on this machine (127.0.0.1, no agent; \
             the first started with `--bootstrap-expect 1`, the others with `--join`): once \
             with `--insecure` (Raft, forwarding and the API in plain HTTP) and once over TLS \
             (API TLS 1.3, Raft RPCs mutual TLS 1.3 with server certificates), in ABBA order \
             (a fresh cluster each round), each figure the mean of its two rounds. A write \
             commits once a second server has appended and fsynced it.\n"
        );
        let _ = writeln!(
            b,
            "| cluster | 1 client p50 ms | 1 client p99 ms | {c} clients writes/s | {c} clients p50 ms |",
            c = opts.clients
        );
        let _ = writeln!(b, "|---|---|---|---|---|");
        for (label, m) in [("plain (`--insecure`)", &self.plain), ("mTLS", &self.tls)] {
            let _ = writeln!(
                b,
                "| {label} | {} | {} | {:.0} | {} |",
                ms(m.single.p50),
                ms(m.single.p99),
                m.rate,
                ms(m.conc.p50)
            );
        }
        let _ = writeln!(
            b,
            "| mTLS / plain | {:.2}x | {:.2}x | {:.2}x | {:.2}x |",
            self.p50_ratio(),
            self.tls.single.p99.as_secs_f64() / self.plain.single.p99.as_secs_f64(),
            self.rate_ratio(),
            self.tls.conc.p50.as_secs_f64() / self.plain.conc.p50.as_secs_f64()
        );
    }

    pub(super) fn rows(&self, opts: &WritesArgs, date: &str) -> Vec<crate::doc::Row> {
        vec![crate::doc::Row {
            metric: format!(
                "Control-plane writes, 3 servers, Raft over mTLS: {} clients writes/s, mTLS / plain (`bench-writes`)",
                opts.clients
            ),
            target: "none (reported)".into(),
            result: format!(
                "{:.0}/s (plain {:.0}/s); 1 client p50 {} ms (plain {} ms)",
                self.tls.rate,
                self.plain.rate,
                ms(self.tls.single.p50),
                ms(self.plain.single.p50)
            ),
            ratio: format!("{:.2}x plain", self.rate_ratio()),
            verdict: "reported".into(),
            date: date.to_owned(),
        }]
    }
}

/// Plain and mTLS clusters in ABBA order (plain, mTLS, mTLS, plain).
pub(super) async fn cluster_tls_vs_plain(
    opts: &WritesArgs,
    dir: &Path,
) -> anyhow::Result<ClusterTlsVsPlain> {
    let mut plain_runs = Vec::new();
    let mut tls_runs = Vec::new();
    for (round, (name, tls)) in [
        ("plain", false),
        ("mtls", true),
        ("mtls", true),
        ("plain", false),
    ]
    .into_iter()
    .enumerate()
    {
        let mut c = Cluster::start(
            &opts.nimbus_bin,
            dir,
            &format!("cluster-{name}-{round}"),
            tls,
        )?;
        let leader = &c.0[0];
        let cfg = leader.tls_config()?;
        let target = Target::Nimbus {
            url: leader.url.clone(),
            token: leader.token.clone(),
        };
        let m = measure_with(&target, &format!("c{}{round}", &name[..1]), opts, cfg).await;
        c.stop();
        let m = m?;
        print(
            &format!("nimbus 3-server cluster {name} (round {round}) keep-alive"),
            &m,
            opts.clients,
        );
        if tls {
            tls_runs.push(m);
        } else {
            plain_runs.push(m);
        }
    }
    let r = ClusterTlsVsPlain {
        plain: mean_measured(&plain_runs[0], &plain_runs[1]),
        tls: mean_measured(&tls_runs[0], &tls_runs[1]),
    };
    println!(
        "writes ratio 3-server mTLS/plain: 1-client p50 {:.2}x | {}-client writes/s {:.2}x",
        r.p50_ratio(),
        opts.clients,
        r.rate_ratio()
    );
    Ok(r)
}
