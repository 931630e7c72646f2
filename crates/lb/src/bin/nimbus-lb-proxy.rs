//! `nimbus-lb-proxy CONFIG.json [--workers N]`: run the nimbus LB data plane from a static JSON
//! [`nimbus_lb::LbConfig`] (used by `scripts/bench-lb`; the agent embeds the library instead).
//! Prints one line `listening PROTO ADDR` per bound listener, then serves until SIGTERM or
//! SIGINT, when it stops (and removes its in-kernel L4 table, if the config enables one).

use std::sync::Arc;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut path = None;
    let mut workers = 2usize;
    while let Some(a) = args.next() {
        if a == "--workers" {
            workers = args.next().and_then(|w| w.parse().ok()).unwrap_or_else(|| {
                eprintln!("nimbus-lb-proxy: --workers needs a number");
                std::process::exit(2)
            });
        } else {
            path = Some(a);
        }
    }
    let Some(path) = path else {
        eprintln!("usage: nimbus-lb-proxy CONFIG.json [--workers N]");
        std::process::exit(2)
    };
    let cfg: nimbus_lb::LbConfig = match std::fs::read_to_string(&path)
        .map_err(|e| e.to_string())
        .and_then(|s| serde_json::from_str(&s).map_err(|e| e.to_string()))
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nimbus-lb-proxy: {path}: {e}");
            std::process::exit(2)
        }
    };
    nimbus_lb::workers::init(workers);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let metrics = Arc::new(nimbus_lb::Metrics::new());
        let lb = match nimbus_lb::LoadBalancer::start(cfg, metrics).await {
            Ok(lb) => lb,
            Err(e) => {
                eprintln!("nimbus-lb-proxy: {e}");
                std::process::exit(1)
            }
        };
        for (p, a) in lb.listen_addrs() {
            println!("listening {p} {a}");
        }
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            eprintln!("nimbus-lb-proxy: cannot install a SIGTERM handler");
            std::process::exit(1)
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        lb.shutdown();
        if let Some(table) = lb.kernel_table() {
            // The table is deleted by the LB's sync task; give it a moment.
            for _ in 0..40 {
                let gone = std::process::Command::new("nft")
                    .args(["list", "table", "ip", table])
                    .output()
                    .map_or(true, |o| !o.status.success());
                if gone {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    });
}
