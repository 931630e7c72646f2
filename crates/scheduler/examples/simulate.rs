//! Runs the scheduler simulator and prints one line per configuration.
//!
//! ```text
//! cargo run --release -p nimbus-scheduler --example simulate -- \
//!     [--nodes 1000,10000] [--requests 100000] [--repeat 3] [--strategy spread,binpack] \
//!     [--algos first-fit,random,power-of-two,full-score,full-scan] [--occupancy 0.7] [--zones 4]
//!     [--seed 1] [--weights 0.4,0.4,0.2]
//! ```
//!
//! Each configuration replays the same seeded workload `--repeat` times and reports medians.

use std::time::Instant;

use nimbus_scheduler::sim::{self, Algorithm, SimReport, Simulation};
use nimbus_scheduler::{Policy, Strategy, Weights};

struct Args {
    nodes: Vec<usize>,
    requests: usize,
    repeat: usize,
    strategies: Vec<Strategy>,
    algos: Vec<Algorithm>,
    occupancy: f64,
    zones: usize,
    seed: u64,
    weights: Weights,
}

fn parse() -> Args {
    let mut a = Args {
        nodes: vec![1000, 10_000],
        requests: 100_000,
        repeat: 3,
        strategies: vec![Strategy::Spread, Strategy::Binpack],
        algos: Algorithm::ALL.to_vec(),
        occupancy: 0.7,
        zones: 4,
        seed: 1,
        weights: Weights::default(),
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut it = argv.iter();
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--nodes" => a.nodes = v.split(',').map(|x| x.parse().expect("--nodes")).collect(),
            "--requests" => a.requests = v.parse().expect("--requests"),
            "--repeat" => a.repeat = v.parse().expect("--repeat"),
            "--occupancy" => a.occupancy = v.parse().expect("--occupancy"),
            "--zones" => a.zones = v.parse().expect("--zones"),
            "--seed" => a.seed = v.parse().expect("--seed"),
            "--weights" => {
                let w: Vec<f64> = v
                    .split(',')
                    .map(|x| x.parse().expect("--weights"))
                    .collect();
                assert_eq!(w.len(), 3, "--weights cpu,memory,network");
                a.weights = Weights {
                    cpu: w[0],
                    memory: w[1],
                    network: w[2],
                };
            }
            "--strategy" => {
                a.strategies = v
                    .split(',')
                    .map(|s| match s {
                        "spread" => Strategy::Spread,
                        "binpack" => Strategy::Binpack,
                        _ => panic!("--strategy spread|binpack"),
                    })
                    .collect();
            }
            "--algos" => {
                a.algos = v
                    .split(',')
                    .map(|s| {
                        *Algorithm::ALL
                            .iter()
                            .find(|x| x.name() == s)
                            .unwrap_or_else(|| panic!("unknown algo {s}"))
                    })
                    .collect();
            }
            _ => panic!("unknown flag {k}"),
        }
    }
    a
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let args = parse();
    for &n in &args.nodes {
        let nodes = sim::generate_nodes(args.seed, n, args.zones);
        let work =
            sim::generate_workload(args.seed, args.requests, &nodes, args.zones, args.occupancy);
        for &strategy in &args.strategies {
            let policy = Policy {
                strategy,
                weights: args.weights,
                ..Policy::default()
            };
            policy.validate().expect("valid policy");
            for &algo in &args.algos {
                let mut rates = Vec::new();
                let mut p50s = Vec::new();
                let mut p99s = Vec::new();
                let mut report: Option<SimReport> = None;
                for _ in 0..args.repeat.max(1) {
                    let mut s = Simulation::new(&nodes, policy, work.clone(), algo, args.seed);
                    let mut lat: Vec<u64> = Vec::with_capacity(args.requests);
                    let start = Instant::now();
                    loop {
                        s.depart();
                        let t = Instant::now();
                        if s.decide().is_none() {
                            break;
                        }
                        lat.push(t.elapsed().as_nanos() as u64);
                    }
                    let wall = start.elapsed().as_secs_f64();
                    lat.sort_unstable();
                    rates.push(lat.len() as f64 / wall);
                    p50s.push(lat[lat.len() / 2] as f64);
                    p99s.push(lat[lat.len() * 99 / 100] as f64);
                    report = Some(s.report());
                }
                let r = report.expect("at least one run");
                let strat = match strategy {
                    Strategy::Spread => "spread",
                    Strategy::Binpack => "binpack",
                };
                println!(
                    "nodes={n} algo={} strategy={strat} {:.0} placements/s p50={:.1}us p99={:.1}us \
                     placed={} failed={} nodes_used={} lower_bound={} efficiency={:.3} \
                     stranded_cpu={:.1}% stranded_mem={:.1}% group_zone_skew={:.2} zone_util_gap={:.1}pp",
                    algo.name(),
                    median(rates),
                    median(p50s) / 1000.0,
                    median(p99s) / 1000.0,
                    r.placed,
                    r.failed,
                    r.nodes_used,
                    r.lower_bound,
                    r.efficiency(),
                    r.stranded_cpu * 100.0,
                    r.stranded_memory * 100.0,
                    r.group_zone_skew,
                    r.zone_util_gap * 100.0,
                );
            }
        }
    }
}
